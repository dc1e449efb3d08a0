import numpy as np
import pytest

from codec import (CodecError, GROUP_SIZE, bits_per_weight, pack_matrix, pack_trits, quantize_matrix, unpack_matrix,
                   unpack_trits)
from codec.trits import from_digits, to_digits


def test_every_byte_value_decodes_by_multiply_and_shift():
    digits = to_digits(np.arange(243), 5)[..., ::-1, :].transpose(1, 0)  # MSB-first rows of 5 digits
    packed = pack_trits(digits.reshape(-1))
    assert packed.shape == (243,)
    assert len(np.unique(packed)) == 243
    np.testing.assert_array_equal(unpack_trits(packed, 243 * 5), digits.reshape(-1))


@pytest.mark.parametrize("n", [1, 4, 5, 6, 17, 1001])
def test_pack_unpack_trits_any_length(n):
    rng = np.random.default_rng(n)
    d = rng.integers(0, 3, size=(3, n), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_trits(pack_trits(d), n), d)


def test_digits_are_balanced_ternary_plus_one():
    q = np.arange(-13, 14)
    digits = to_digits(q[None] + 13, 3)[0]  # [3, 27]
    balanced = digits.astype(int) - 1
    np.testing.assert_array_equal((balanced * np.array([1, 3, 9])[:, None]).sum(0), q)
    np.testing.assert_array_equal(from_digits(digits[None])[0], q + 13)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(7, 48), (13, 16 * 11), (64, 1024)])
def test_matrix_round_trip_is_exact(depth, shape):
    rng = np.random.default_rng(depth)
    w = rng.standard_normal(shape).astype(np.float32)
    qm = quantize_matrix(w, depth)
    back = unpack_matrix(pack_matrix(qm), shape[1])
    np.testing.assert_array_equal(back.codes, qm.codes)
    np.testing.assert_array_equal(back.scale_idx, qm.scale_idx)
    np.testing.assert_array_equal(back.codebook, qm.codebook)
    assert back.depth == depth
    assert np.abs(qm.codes).max() <= (3 ** depth - 1) // 2


@pytest.mark.parametrize("depth,budget", [(1, 1.95), (2, 3.55), (3, 5.15), (4, 6.80)])
@pytest.mark.parametrize("shape", [(896, 896), (2048, 2048), (2048, 11008), (4864, 896)])
def test_bits_per_weight_under_budget(depth, budget, shape):
    bpw = bits_per_weight(*shape, depth)
    assert bpw <= budget, f"{bpw:.4f} bits/weight at depth {depth} on {shape}"
    # and the packed arrays really are that big
    w = np.random.default_rng(0).standard_normal((shape[0] // 8, shape[1])).astype(np.float32)
    packed = pack_matrix(quantize_matrix(w, depth))
    assert sum(a.nbytes for a in packed.values()) * 8 / w.size <= budget + 0.01


def test_in_features_not_multiple_of_group_is_a_clear_error():
    with pytest.raises(CodecError, match=f"multiple of the group size {GROUP_SIZE}"):
        quantize_matrix(np.ones((4, 40), np.float32), 3, name="layer.weight")


def test_nan_weights_are_a_clear_error():
    w = np.ones((4, 32), np.float32)
    w[2, 5] = np.nan
    with pytest.raises(CodecError, match=r"'bad.weight'.*NaN"):
        quantize_matrix(w, 3, name="bad.weight")
