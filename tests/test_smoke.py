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
