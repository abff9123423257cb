"""fuse: BatchNorm folded into the Linear/Conv2d before it; the original is untouched."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import nn

from model_pairs import assert_close, batch, fn_cnn, fn_mlp, to_layout


def _trained_eval(model, kind, layout, steps=3):
    opt = fn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for s in range(steps):
        x, y = batch(kind, seed=s)
        loss = fn.functional.cross_entropy(model(to_layout(x, layout)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # make the affine parameters non-trivial too
    rng = np.random.default_rng(5)
    for m in model.modules():
        if isinstance(m, nn._BatchNorm):
            m.weight.data[...] = rng.uniform(0.5, 2.0, m.weight.shape)
            m.bias.data[...] = rng.standard_normal(m.bias.shape)
    return model.eval()


@pytest.mark.parametrize("kind,layout", [("mlp", "NCHW"), ("cnn", "NCHW"), ("cnn", "NHWC")])
def test_fused_equals_unfused(kind, layout):
    model = _trained_eval(fn_mlp() if kind == "mlp" else fn_cnn(layout), kind, layout)
    before = model.state_dict()
    fused = fn.fuse(model)
    assert fused is not model
    assert not any(isinstance(m, nn._BatchNorm) for m in fused.modules())
    assert sum(isinstance(m, nn.Identity) for m in fused.modules()) == (1 if kind == "mlp" else 2)
    x = to_layout(batch(kind, n=16, seed=11)[0], layout)
    ref = model(x).data
    with fn.inference_mode():
        out = fused(x).data
    assert_close(out, ref, 1e-5)
    # the original is unchanged and still trainable
    after = model.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert model.train() is model and model.training


def test_conv_without_bias_and_standalone_batchnorm():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.BatchNorm2d(4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = rng.standard_normal(m.num_features).astype(np.float32)
            m.running_var = rng.uniform(0.5, 2, m.num_features).astype(np.float32)
            m.weight.data[...] = rng.uniform(0.5, 2.0, m.num_features)
    model.eval()
    fused = fn.fuse(model)
    kinds = [type(m).__name__ for m in fused.children()]
    assert kinds == ["ChannelAffine", "Conv2d", "Identity", "ReLU", "ChannelAffine"]
    assert fused[1].bias is not None and model[1].bias is None
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert_close(fused(x).data, model(x).data, 1e-5)


def test_bn_inside_custom_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.lin(x)).relu()

    m = Block()
    m(np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    m.eval()
    fused = fn.fuse(m)
    assert isinstance(fused.bn, nn.ChannelAffine)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    assert_close(fused(x).data, m(x).data, 1e-5)


def test_refuses_training_mode_and_is_eval_only():
    model = fn_mlp()
    with pytest.raises(ValueError, match="eval mode"):
        fn.fuse(model)
    model.eval()
    model[1].train()  # one submodule still training is enough to refuse
    with pytest.raises(ValueError, match="eval mode"):
        fn.fuse(model)
    fused = fn.fuse(model.eval())
    with pytest.raises(ValueError, match="eval-only"):
        fused.train()
    assert fused.eval() is fused
    assert not any(p.requires_grad for p in fused.parameters())
    with pytest.raises(TypeError, match="Module"):
        fn.fuse(object())
