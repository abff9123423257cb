"""save / load_into / load_metadata for .safetensors and .npz, and PyTorch interop."""
import os

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import serialization

from model_pairs import assert_close, batch, fn_cnn, fn_mlp, pair, to_layout, torch_cnn

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

EXTS = [".safetensors", ".npz"]


def _trained(kind="cnn", layout="NCHW"):
    """A fastnorm model whose running stats and num_batches_tracked are not the defaults."""
    m = fn_cnn(layout) if kind == "cnn" else fn_mlp()
    for s in range(2):
        m(to_layout(batch(kind, seed=s)[0], layout))
    return m.eval()


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_round_trip(tmp_path, ext, layout):
    m = _trained("cnn", layout)
    path = tmp_path / f"model{ext}"
    fn.save(m, path, metadata={"epoch": "3"})
    fresh = fn_cnn(layout).eval()
    assert fn.load_into(fresh, path) is fresh
    a, b = m.state_dict(), fresh.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape, k
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    nbt = fresh[1].num_batches_tracked
    assert nbt.dtype == np.int64 and nbt.shape == () and int(nbt) == 2
    x = to_layout(batch("cnn", seed=9)[0], layout)
    np.testing.assert_array_equal(fresh(x).data, m(x).data)  # eval cache was refreshed
    assert fn.load_metadata(path) == {"epoch": "3"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".fastnorm-")]


@pytest.mark.parametrize("ext", EXTS)
def test_no_metadata(tmp_path, ext):
    path = tmp_path / f"m{ext}"
    fn.save(fn_mlp(), str(path))
    assert fn.load_metadata(path) == {}
    assert set(serialization.load_state(path)) == set(fn_mlp().state_dict())


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_load_torch_exported_safetensors(tmp_path, layout):
    from safetensors.torch import save_file
    tm, _ = pair(torch, "cnn")
    x, y = batch("cnn")
    tm.train()
    tm(torch.tensor(x))  # non-default running stats, num_batches_tracked = 1
    tm.eval()
    path = tmp_path / "torch.safetensors"
    save_file(tm.state_dict(), str(path), metadata={"source": "torch"})
    fm = fn.load_into(fn_cnn(layout).eval(), path)
    assert int(fm[1].num_batches_tracked) == 1
    with torch.no_grad():
        ref = tm(torch.tensor(x)).numpy()
    assert_close(fm(to_layout(x, layout)).data, ref)
    assert fn.load_metadata(path) == {"source": "torch"}


def test_fastnorm_file_loads_into_torch(tmp_path):
    from safetensors.torch import load_file
    m = _trained("cnn")
    path = tmp_path / "fn.safetensors"
    fn.save(m, path)
    tm = torch_cnn(torch)
    tm.load_state_dict(load_file(str(path)))
    tm.eval()
    x = batch("cnn", seed=4)[0]
    with torch.no_grad():
        assert_close(m(x).data, tm(torch.tensor(x)).numpy())


def test_float64_file_into_float32_model(tmp_path):
    m64 = fn_mlp(dtype=np.float64)
    path = tmp_path / "m.npz"
    fn.save(m64, path)
    m32 = fn.load_into(fn_mlp(), path)
    assert m32[0].weight.dtype == np.float32
    np.testing.assert_allclose(m32[0].weight.data, m64[0].weight.data, rtol=1e-6)


def test_errors(tmp_path):
    m = fn_mlp()
    with pytest.raises(ValueError, match=r"\.safetensors or \.npz.*'\.pt'"):
        fn.save(m, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"\.safetensors or \.npz"):
        fn.load_into(m, tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError, match="no such file"):
        fn.load_into(m, tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError):
        fn.load_metadata(tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="metadata"):
        fn.save(m, tmp_path / "m.npz", metadata={"epoch": 3})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read"):
        fn.load_into(m, bad)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not read"):
        fn.load_into(m, bad)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("ext", EXTS)
def test_mismatched_file_leaves_model_unchanged(tmp_path, ext):
    path = tmp_path / f"cnn{ext}"
    fn.save(_trained("cnn"), path)
    m = fn_mlp()
    before = m.state_dict()
    with pytest.raises(ValueError, match="missing key"):
        fn.load_into(m, path)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "m.safetensors"
    a, b = fn_mlp(), fn_mlp()
    fn.save(a, path)
    fn.save(b, path)
    got = serialization.load_state(path)
    np.testing.assert_array_equal(got["0.weight"], b[0].weight.data)
