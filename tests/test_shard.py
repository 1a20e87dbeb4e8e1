"""The NF4 weight in row shards: the ops FSDP2 shards with and its all-gather contract,
run in one process (the multi-process runs are in test_distributed.py)."""

import pytest
import torch
from torch import nn

import nf4lib
from nf4lib import NF4Tensor


def _weight(out_f=256, in_f=128, double_quant=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NF4Tensor.from_quantized(nf4lib.quantize(torch.randn(out_f, in_f, generator=g), double_quant=double_quant))


def _fsdp_shard(w, world, rank):
    """What FSDP2's _init_sharded_param does to a parameter, in order."""
    chunks = list(torch.chunk(w, world, dim=0))
    padded = chunks[0].new_zeros(chunks[0].size())
    padded.narrow(0, 0, chunks[rank].size(0)).copy_(chunks[rank])
    padded.view(-1)  # FSDP2 keeps a flat view
    return padded.narrow(0, 0, chunks[rank].size(0))


def _all_gather(shards, outer_size, out=None, dtype=None):
    """FSDP2's all-gather of the extension's inputs: per input, the ranks' pieces concatenated."""
    pre = [s.fsdp_pre_all_gather(None, outer_size, None, None, None) for s in shards]
    inputs = [p[0] for p in pre]
    outputs = tuple(torch.cat([inp[i] for inp in inputs]) for i in range(len(inputs[0])))
    if out is not None:
        for t, o in zip(out, outputs):
            t.copy_(o)  # FSDP2 gathers into the same storages every time
        outputs = out
    return shards[0].fsdp_post_all_gather(outputs, pre[0][1], dtype or shards[0].dtype), outputs


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp_shard_then_all_gather_rebuilds_the_weight_bit_for_bit(double_quant, world):
    w = _weight(256, 256, double_quant)
    shards = [_fsdp_shard(w, world, r) for r in range(world)]
    for r, s in enumerate(shards):
        assert isinstance(s, NF4Tensor) and s.shape == (256 // world, 256)
        assert s.packed.numel() * world == w.packed.numel()  # 1/world of the 4-bit bytes
        torch.testing.assert_close(s.dequantize(), w.dequantize()[r * 256 // world:(r + 1) * 256 // world], rtol=0, atol=0)
    (full, inner), outputs = _all_gather(shards, w.shape)
    assert isinstance(full, NF4Tensor) and full.shape == w.shape and full.qlayout == w.qlayout
    for k, t in w._inner().items():
        assert torch.equal(getattr(full, k), t), k
    # the unsharded weight views the all-gather outputs: FSDP2 frees and refills them
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(inner, outputs))


def test_all_gather_sends_the_bytes_as_integers_never_as_floats():
    w = _weight(128, 128)
    # bytes whose bf16/fp16 reading is a NaN (0x7fff, 0xffff...): a float round trip may canonicalise them
    w.packed.copy_(torch.tensor([0xFF, 0x7F, 0xFF, 0xFF, 0xC1, 0x7F], dtype=torch.uint8).repeat(w.packed.numel() // 6 + 1)[: w.packed.numel()])
    shards = [_fsdp_shard(w, 2, r) for r in range(2)]
    inputs, _ = shards[0].fsdp_pre_all_gather(None, w.shape, None, None, None)
    assert [t.dtype for t in inputs] == [torch.uint8, torch.float32]
    (full, _), _ = _all_gather(shards, w.shape)
    assert torch.equal(full.packed, w.packed)


def test_later_all_gathers_reuse_the_out_storages():
    w = _weight(256, 256, double_quant=True)
    shards = [_fsdp_shard(w, 2, r) for r in range(2)]
    (full, inner), _ = _all_gather(shards, w.shape, dtype=torch.bfloat16)
    assert full.dtype == torch.bfloat16 and full.packed.dtype == torch.uint8  # bf16 compute, same bytes
    ptrs = [t.data_ptr() for t in inner]
    for t in inner:
        t.zero_()  # FSDP2 frees these storages after forward...
    pre = [s.fsdp_pre_all_gather(None, w.shape, None, None, None) for s in shards]
    for i, t in enumerate(inner):
        t.copy_(torch.cat([p[0][i] for p in pre]))  # ...and the next all-gather refills them
    assert shards[0].fsdp_post_all_gather(inner, pre[0][1], torch.bfloat16, out=full) is None
    assert [t.data_ptr() for t in (full.packed, full.absmax, full.nested_absmax)] == ptrs
    assert torch.equal(full.packed, w.packed) and torch.equal(full.absmax, w.absmax)


def test_post_all_gather_copies_into_out_when_storages_differ():
    w = _weight(128, 128)
    shards = [_fsdp_shard(w, 2, r) for r in range(2)]
    (full, _), _ = _all_gather(shards, w.shape)
    out = full.clone()
    out.packed.zero_()
    pre = [s.fsdp_pre_all_gather(None, w.shape, None, None, None) for s in shards]
    outputs = tuple(torch.cat([p[0][i] for p in pre]) for i in range(2))
    shards[0].fsdp_post_all_gather(outputs, pre[0][1], w.dtype, out=out)
    assert torch.equal(out.packed, w.packed)


def test_row_slices_and_views_share_the_bytes():
    w = _weight(256, 128)
    top = w.narrow(0, 0, 128)
    assert isinstance(top, NF4Tensor) and top.packed.data_ptr() == w.packed.data_ptr()
    assert torch.equal(top.dequantize(), w.dequantize()[:128])
    assert w[64:192].shape == (128, 128)
    torch.testing.assert_close(w[64:192].dequantize(), w.dequantize()[64:192], rtol=0, atol=0)
    assert w.narrow(0, 0, 256) is not w and w.narrow(0, 0, 256).packed.data_ptr() == w.packed.data_ptr()
    flat = w.view(-1)
    assert isinstance(flat, NF4Tensor) and flat.shape == (256 * 128,) and flat.packed.data_ptr() == w.packed.data_ptr()
    assert torch.equal(flat.view(256, 128).dequantize(), w.dequantize())
    same = torch.as_strided(w, w.shape, w.stride(), 0)
    assert isinstance(same, NF4Tensor) and same.packed.data_ptr() == w.packed.data_ptr()
    odd = _weight(6, 96)
    part = odd.narrow(0, 0, 3)  # cuts through a block: a dense slice, not an error
    assert type(part) is torch.Tensor and torch.equal(part, odd.dequantize()[:3])
    parts = torch.split(w, [64, 192])
    assert [p.shape[0] for p in parts] == [64, 192]
    torch.testing.assert_close(torch.cat([p.dequantize() for p in parts]), w.dequantize(), rtol=0, atol=0)


def test_new_zeros_is_an_nf4_weight_of_zeros_in_the_same_layout():
    w = _weight(256, 256, double_quant=True)
    z = w.new_zeros((128, 256))
    assert isinstance(z, NF4Tensor) and z.qlayout == w.qlayout and z.shape == (128, 256)
    assert torch.equal(z.dequantize(), torch.zeros(128, 256))
    assert torch.equal(z.quant_map, w.quant_map) and z.quant_map.data_ptr() != w.quant_map.data_ptr()
    plain = w.new_zeros((3,), dtype=torch.int64)  # not a weight shape: a plain tensor
    assert type(plain) is torch.Tensor and plain.dtype == torch.int64


def test_bad_shards_name_the_layer_and_the_shapes():
    model = nf4lib.convert(nn.Sequential(nn.Linear(96, 6)), exclude=())
    with pytest.raises(ValueError, match=r"NF4 weight '0' of shape \(6, 96\).*3 x 96 = 288 weights.*multiple of 64"):
        torch.chunk(model[0].weight, 2)
    with pytest.raises(ValueError, match=r"5 rows do not split into equal shards of 3"):
        torch.chunk(_weight(5, 128), 2)
    with pytest.raises(ValueError, match=r"256-block groups = 16384"):
        torch.chunk(_weight(128, 128, double_quant=True), 2)
    with pytest.raises(RuntimeError, match="only the identity view"):
        torch.as_strided(_weight(4, 64), (2, 64), (64, 1))
    with pytest.raises(ValueError, match="transposed"):
        _weight(128, 128).t().fsdp_pre_all_gather(None, (128, 128), None, None, None)


def test_copy_refuses_integer_sources_rather_than_quantize_bytes():
    w = _weight(128, 128)
    before = w.packed.clone()
    with pytest.raises(TypeError, match="takes float values"):
        w.copy_(torch.zeros(128, 128, dtype=torch.uint8))
    assert torch.equal(w.packed, before)


def test_kernel_output_is_not_a_view():
    # FSDP2 warns (and in-place ops misbehave) when a module returns a view
    layer = nf4lib.NF4Linear.from_linear(nn.Linear(128, 64))
    assert not layer(torch.randn(2, 3, 128))._is_view()
    assert not layer(torch.randn(5, 128))._is_view()
