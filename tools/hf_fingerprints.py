"""Print the fingerprints (vitops.hf._patch.fingerprint) of the HF functions vitops.hf.patch reproduces,
for the installed transformers: run it under each supported release when adding one, and compare with
the ``_FINGERPRINTS`` tables of vitops/hf/{gemma4,gemma3,llama4}.py.

    python tools/hf_fingerprints.py            # the installed transformers
    PYTHONPATH=/tmp/tf517 python tools/hf_fingerprints.py   # another release unpacked with pip --target
"""

import importlib

import transformers

from vitops.hf._patch import FAMILIES, _family_sites, fingerprint

print(f"transformers {transformers.__version__}")
for family in FAMILIES:
    for site in _family_sites(family):
        module = importlib.import_module(site.module)
        for qualname in site.fingerprints:
            owner, _, attr = qualname.rpartition(".")
            fn = getattr(getattr(module, owner), attr) if owner else getattr(module, attr)
            if qualname == site.name:
                fn = getattr(module, site.cls).__dict__[site.attr]
            print(f"{family:7s} {site.flag:16s} {qualname:60s} {fingerprint(fn)}")
