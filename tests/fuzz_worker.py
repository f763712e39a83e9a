"""Runs fuzz cases in a fresh process (tests/test_fuzz.py starts it), so that a crash or a hang in a
kernel fails the test instead of killing pytest.

    python fuzz_worker.py NAMESPACE KIND OP SEED_START SEED_END

Prints ``START <seed>`` before each case and ``RESULT <json>`` after it; the parent names the case
that was running when the process died or timed out.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fuzz_cases  # noqa: E402


def main() -> int:
    namespace, kind, op, start, end = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    if namespace == "vitops_emu":
        from vitops.testing import load_cuda_emulator

        if not load_cuda_emulator():
            print("NO_EMULATOR", flush=True)
            return 0
    torch.set_num_threads(1)
    for seed in range(start, end):
        print(f"START {seed}", flush=True)
        try:
            if kind == "valid":
                case, kw = fuzz_cases.valid_case(op, seed, namespace)
                problem = fuzz_cases.run_case(case, namespace)
                if problem is None and namespace == "vitops":
                    problem = fuzz_cases.check_backward(op, kw)
                elif problem is None:
                    problem = fuzz_cases.check_emulated_backward(op, kw)
            else:
                case = fuzz_cases.invalid_case(op, seed, namespace)
                problem = fuzz_cases.run_case(case, namespace)
        except Exception as e:  # noqa: BLE001 - the harness itself must not hide a case
            case = None
            problem = f"harness error {type(e).__name__}: {e}"
        describe = case.describe if case is not None else f"{kind} {op} seed={seed}"
        print("RESULT " + json.dumps({"seed": seed, "case": describe, "problem": problem}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
