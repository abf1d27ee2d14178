import gzip

import pytest
import torch

from darkknowledge.config import DigitsData, IdxData
from darkknowledge.data import (
    augment,
    hflip,
    jitter,
    load_data,
    load_digits_split,
    make_transfer_set,
    read_idx,
    split_train_val,
)
from darkknowledge.errors import DKError


def test_read_real_mnist_test_split(mnist_dir):
    images = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype.name == "uint8"
    assert labels.shape == (10000,)
    assert sorted(set(labels.tolist())) == list(range(10))
    # the first test digit of MNIST is a 7
    assert labels[0] == 7


def test_load_mnist_folder_with_limit(mnist_dir):
    cfg = IdxData(name="idx", path=mnist_dir, limit=2000, val_fraction=0.1)
    d = load_data(cfg)
    assert d.train.x.shape[1:] == (1, 28, 28)
    assert len(d.train) + len(d.val) == 2000 and len(d.test) == 10000
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) <= 1.0
    assert d.train.num_classes == 10


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"\x01\x02\x08\x01\x00\x00\x00\x02ab", "bad magic"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05ab", "holds 2 bytes"),
        (b"\x00\x00", "bad magic"),
    ],
)
def test_bad_idx_files(tmp_path, payload, needle):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(payload)
    with pytest.raises(DKError, match=needle):
        read_idx(p)
    g = tmp_path / "x.gz"
    g.write_bytes(gzip.compress(payload)[:-4])  # truncated gzip
    with pytest.raises(DKError, match=str(g.name)):
        read_idx(g)


def test_digits_split_is_seeded_and_disjoint():
    a_train, a_test = load_digits_split(0.3, 0)
    b_train, _b_test = load_digits_split(0.3, 0)
    c_train, _ = load_digits_split(0.3, 1)
    assert torch.equal(a_train.ids, b_train.ids) and not torch.equal(a_train.ids, c_train.ids)
    assert set(a_train.ids.tolist()).isdisjoint(a_test.ids.tolist())
    assert len(a_train) + len(a_test) == 1797
    tr, va = split_train_val(a_train, 0.1, 0)
    assert set(tr.ids.tolist()).isdisjoint(va.ids.tolist())
    assert len(tr) + len(va) == len(a_train)


def test_transfer_set_omits_classes_and_labels():
    train, _ = load_digits_split()
    t = make_transfer_set(train, fraction=0.5, omit_classes=[3], labels=True, seed=0)
    assert 3 not in set(t.y.tolist())
    assert abs(len(t) - 0.5 * int((train.y != 3).sum())) <= 1
    assert set(t.ids.tolist()) <= set(train.ids.tolist())
    u = make_transfer_set(train, labels=False)
    assert u.y is None and len(u) == len(train)
    with pytest.raises(DKError, match="class 12"):
        make_transfer_set(train, omit_classes=[12])


def test_data_config_transfer_section():
    d = load_data(DigitsData(name="digits", transfer={"omit_classes": [0, 1], "labels": False}))
    assert d.transfer.y is None
    assert not set(d.transfer.ids.tolist()) & set(
        d.train.ids[(d.train.y == 0) | (d.train.y == 1)].tolist()
    )


def test_jitter_shifts_within_bounds_and_is_seeded():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0  # a 2x2 blob in the middle
    a = jitter(x, 2, torch.Generator().manual_seed(0))
    b = jitter(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.shape == x.shape
    assert torch.equal(a.sum((1, 2, 3)), x.sum((1, 2, 3)))  # blob stays inside: nothing lost
    # every image is a translate of the original by at most 2 px
    for i in range(64):
        ys, xs = a[i, 0].nonzero(as_tuple=True)
        assert 1 <= int(ys.min()) <= 5 and 1 <= int(xs.min()) <= 5
    assert len({tuple(a[i, 0].nonzero()[0].tolist()) for i in range(64)}) > 5


def test_hflip_mirrors_some_images_and_augment_keeps_the_jitter_stream():
    x = torch.rand(64, 1, 6, 6, generator=torch.Generator().manual_seed(1))  # asymmetric
    h = hflip(x, torch.Generator().manual_seed(0))
    flipped = [not torch.equal(h[i], x[i]) for i in range(64)]
    for i in range(64):  # each image is itself or its mirror image
        assert torch.equal(h[i], x[i].flip(-1) if flipped[i] else x[i])
    assert 16 <= sum(flipped) <= 48
    # augment="jitter" draws exactly what jitter() draws: earlier jittered runs repeat
    j = jitter(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(augment(x, "jitter", 2, torch.Generator().manual_seed(0)), j)
    both = augment(x, "jitter_hflip", 2, torch.Generator().manual_seed(0))
    mirrored = sum(not torch.equal(both[i], j[i]) for i in range(64))
    assert all(torch.equal(both[i], j[i]) or torch.equal(both[i], j[i].flip(-1)) for i in range(64))
    assert 16 <= mirrored <= 48


def test_fit_applies_hflip():
    from darkknowledge.config import TrainConfig
    from darkknowledge.losses import CE, LossStack
    from darkknowledge.models import MLP
    from darkknowledge.train import fit

    train, _ = load_digits_split()

    def weights(aug: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = MLP(train.input_shape, 10, hidden=[16])
        cfg = TrainConfig(epochs=1, max_steps=5, batch_size=64, augment=aug, seed=0)
        fit(model, train, cfg, LossStack.of(CE()))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    a, b = weights("hflip"), weights("hflip")
    assert torch.equal(a, b)  # seeded: the same flips every run
    assert not torch.equal(a, weights("none"))  # the flips reach the training loop


def test_transfer_set_with_augmented_copies():
    from darkknowledge.data import plain_training_set

    cfg = DigitsData(name="digits", transfer={"augment": "jitter_hflip", "copies": 2})
    d, again = load_data(cfg), load_data(cfg)
    n = len(d.train)
    assert len(d.transfer) == 3 * n
    assert torch.equal(d.transfer.x, again.transfer.x)  # drawn once from a fixed seed
    assert torch.equal(d.transfer.x[:n], d.train.x) and torch.equal(d.transfer.y[:n], d.train.y)
    assert torch.equal(d.transfer.y, d.train.y.repeat(3))
    assert len(set(d.transfer.ids.tolist())) == 3 * n  # copies get ids of their own
    assert not set(d.transfer.ids.tolist()) & set(d.val.ids.tolist() + d.test.ids.tolist())
    copy1, copy2 = d.transfer.x[n : 2 * n], d.transfer.x[2 * n :]
    assert not torch.equal(copy1, d.train.x) and not torch.equal(copy1, copy2)
    # zero-fill shifts and mirrors never add ink, and most images keep nearly all of it
    ink, ink1 = d.train.x.sum((1, 2, 3)), copy1.sum((1, 2, 3))
    assert (ink1 <= ink + 1e-4).all() and (ink1 > 0.8 * ink).float().mean() > 0.5
    assert plain_training_set(cfg, d) is d.transfer  # the plain baseline sees the same images
    omit = DigitsData(
        name="digits", transfer={"omit_classes": [3], "augment": "jitter", "copies": 1}
    )
    d3 = load_data(omit)
    assert 3 not in set(d3.transfer.y.tolist()) and len(d3.transfer) == 2 * int(
        (d3.train.y != 3).sum()
    )
    plain = plain_training_set(omit, d3)  # the full training set, 3s included, plus one copy
    assert len(plain) == 2 * n and torch.equal(plain.y, d3.train.y.repeat(2))
    assert plain_training_set(DigitsData(name="digits"), d) is d.train
    with pytest.raises(ValueError, match="copies=2 with augment=none"):
        DigitsData(name="digits", transfer={"copies": 2})
    with pytest.raises(ValueError, match="copies=0 with augment=jitter"):
        DigitsData(name="digits", transfer={"augment": "jitter"})
