"""Run by tests/test_hf_patch.py in a fresh process, possibly under another transformers release
(PYTHONPATH): patch each family's tiny model and print, as JSON, the transformers version, the
report, the relative error of the soft tokens patched vs unpatched and whether generate() agrees."""

import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import _hf_tiny  # noqa: E402

import transformers  # noqa: E402
import vitops  # noqa: E402

result = {"transformers": transformers.__version__, "families": {}}
for family in _hf_tiny.FAMILIES:
    model, inputs = _hf_tiny.build(family)
    with torch.no_grad():
        ref = _hf_tiny.image_features(model, inputs)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    report = vitops.hf.patch(model)
    with torch.no_grad():
        out = _hf_tiny.image_features(model, inputs)
    patched_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    result["families"][family] = {
        "patched": list(report.patched),
        "rel_err": ((out - ref).abs().max() / ref.abs().max()).item(),
        "same_tokens": bool(torch.equal(tokens, patched_tokens)),
    }
print(json.dumps(result))
