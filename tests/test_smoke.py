import torch

import deltackpt


def test_save_load_roundtrip_small(store):
    state = {"w": torch.arange(10, dtype=torch.float32), "n": 3}
    r = store.save(state, step=1)
    assert r.step == 1 and r.new_chunks == 1
    out = store.load(1)
    assert out["n"] == 3 and torch.equal(out["w"], state["w"])
    assert store.steps() == [1]
    assert isinstance(deltackpt.open, object)


def test_integrations_are_reachable_from_a_plain_import():
    """README: Trainer(plugins=[deltackpt.lightning.DeltaCheckpointIO(...)]) after just
    `import deltackpt` (submodules with optional dependencies load on first use)."""
    import subprocess
    import sys

    code = ("import sys, deltackpt\n"
            "assert 'deltackpt.dcp' not in sys.modules\n"
            "print(deltackpt.dcp.StorageWriter.__name__, deltackpt.hf.__name__)\n"
            "try:\n    deltackpt.no_such_thing\nexcept AttributeError:\n    print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["StorageWriter", "deltackpt.hf", "ok"]
