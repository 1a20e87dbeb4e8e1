"""torch.func transforms through quantized_linear and converted models, against the dense
formula ``y = x @ W.T + b`` (W = the dequantized weight, which is constant)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

import nf4lib


def _setup(double_quant):
    torch.manual_seed(0)
    q = nf4lib.quantize(torch.randn(24, 40), double_quant=double_quant)
    w = nf4lib.dequantize(q)
    return q, w, torch.randn(3, 40), torch.randn(24)


def _loss(y):
    return (y.sin() * torch.arange(y.shape[-1], dtype=y.dtype)).sum()


@pytest.mark.parametrize("double_quant", [False, True])
def test_grad_vjp_jacrev_equal_the_dense_formula(double_quant):
    q, w, x, b = _setup(double_quant)
    f = lambda x, b: _loss(nf4lib.quantized_linear(x, q, b))  # noqa: E731
    dense = lambda x, b: _loss(F.linear(x, w, b))  # noqa: E731
    # The forward differs from F.linear by float32 summation order (~2e-6 here: the CPU
    # kernel's own matmul and bias add); the loss's sin and its weights up to 23 scale
    # that into the gradient (measured up to 1e-4 on an AVX2 machine), so 5e-4.
    for got, want in zip(grad(f, argnums=(0, 1))(x, b), grad(dense, argnums=(0, 1))(x, b)):
        torch.testing.assert_close(got, want, rtol=5e-4, atol=5e-4)
    y, pull = vjp(lambda x: nf4lib.quantized_linear(x, q, b), x)
    ct = torch.randn_like(y)
    torch.testing.assert_close(pull(ct)[0], ct @ w, rtol=1e-5, atol=1e-5)
    jac = jacrev(lambda x: nf4lib.quantized_linear(x, q))(x[0])
    torch.testing.assert_close(jac, w, rtol=1e-5, atol=1e-6)  # dy/dx = W


@pytest.mark.parametrize("double_quant", [False, True])
def test_jvp_forward_mode_treats_the_weight_as_constant(double_quant):
    q, w, x, b = _setup(double_quant)
    tx, tb = torch.randn_like(x), torch.randn_like(b)
    y, ty = jvp(lambda x, b: nf4lib.quantized_linear(x, q, b), (x, b), (tx, tb))
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ty, tx @ w.T + tb, rtol=1e-5, atol=1e-5)
    # forward-over-reverse: the Hessian-vector product of a quadratic loss
    hvp = jvp(lambda x: grad(lambda x: nf4lib.quantized_linear(x, q).pow(2).sum())(x), (x,), (tx,))[1]
    torch.testing.assert_close(hvp, 2 * (tx @ w.T) @ w, rtol=1e-4, atol=1e-4)


def test_vmap_of_grad_gives_per_example_gradients():
    q, w, x, b = _setup(True)
    per_example = vmap(grad(lambda xi: _loss(nf4lib.quantized_linear(xi, q, b))))(x)
    for i in range(3):
        want = grad(lambda xi: _loss(F.linear(xi, w, b)))(x[i])
        torch.testing.assert_close(per_example[i], want, rtol=1e-4, atol=1e-4)  # fp32 summation order


def _model(double_quant=False):
    torch.manual_seed(0)
    return nf4lib.convert(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16)), double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_functional_call_and_grad_through_a_converted_model(double_quant):
    model = _model(double_quant)
    x = torch.randn(5, 32)
    params = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
    # new biases through functional_call change the output as a dense model's would
    new = {k: (v + 1 if k.endswith("bias") else v) for k, v in params.items()}
    dense = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))
    with torch.no_grad():
        for i in (0, 2):
            dense[i].weight.copy_(model[i].dequantize())
            dense[i].bias.copy_(model[i].bias + 1)
    torch.testing.assert_close(functional_call(model, new, (x,)), dense(x), rtol=1e-5, atol=1e-5)
    # gradients w.r.t. the trainable parameters only (the 4-bit weights are frozen)
    trainable = {k: v for k, v in params.items() if v.requires_grad}
    assert sorted(trainable) == ["0.bias", "2.bias"]
    g = grad(lambda p: functional_call(model, {**params, **p}, (x,)).pow(2).sum())(trainable)
    want = torch.autograd.grad(model(x).pow(2).sum(), [model[0].bias, model[2].bias])
    for k, w in zip(["0.bias", "2.bias"], want):
        torch.testing.assert_close(g[k], w, rtol=1e-5, atol=1e-5)


def test_grad_wrt_input_through_a_converted_model():
    model = _model()
    x = torch.randn(4, 32)
    gx = grad(lambda x: model(x).pow(2).sum())(x)
    x2 = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(model(x2).pow(2).sum(), x2)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)
