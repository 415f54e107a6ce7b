"""Fails CI unless the tiny pipeline's Δ-tokens carry the motion its questions ask about:
held-out accuracy with `cope` must beat `zero` (Δ-tokens zeroed, paper App. H.3) by MARGIN."""

import json
import sys

MARGIN = 0.3  # seen on this machine: cope 1.000, zero 0.325, keyframes_only 0.150-0.325 (40 questions, chance 0.25)

result = json.load(open(sys.argv[1]))
cope, zero = result["accuracy_cope"], result["accuracy_zero"]
print(f"demo accuracy: cope {cope:.3f}, zero {zero:.3f}, keyframes_only {result.get('accuracy_keyframes_only', float('nan')):.3f}")
if cope < zero + MARGIN:
    sys.exit(f"error: Δ-tokens do not help enough: cope {cope:.3f} < zero {zero:.3f} + {MARGIN}")
