"""The built-in look-alike set: splits, determinism, look-alike structure, speed."""


import numpy as np
import pytest

from fewshot_lkca.data import DataError, LookalikeDataset, lookalike_classes, render_lookalike
from fewshot_lkca.data.lookalike import FAMILIES, contact_sheet


def test_splits_are_disjoint_and_large_enough():
    base, val, novel = (set(lookalike_classes(s)) for s in ("base", "val", "novel"))
    assert len(base) >= 40 and len(novel) >= 10 and len(val) >= 5
    assert not base & val and not base & novel and not val & novel
    assert base | val | novel == set(lookalike_classes())


def _differing_bit(a: str, b: str) -> int | None:
    """Which design bit two variants differ in, if exactly one."""
    diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    return diff[0] if len(diff) == 1 else None


@pytest.mark.parametrize("split", ["novel", "val"])
def test_every_class_has_a_one_part_look_alike_in_its_split(split):
    classes = lookalike_classes(split)
    for name in classes:
        family, bits = name.split("-")
        siblings = [n for n in classes if n != name and n.split("-")[0] == family]
        assert any(_differing_bit(bits, s.split("-")[1]) is not None for s in siblings), name


def test_val_pairs_differ_where_the_novel_pairs_do():
    # Selection on val has to see the kind of difference novel tests: same families, same design choice.
    def pairs(split):
        by_family = {}
        for name in lookalike_classes(split):
            family, bits = name.split("-")
            by_family.setdefault(family, []).append(bits)
        return {f: _differing_bit(*v) for f, v in by_family.items()}
    assert pairs("val") == pairs("novel")


def test_novel_families_also_appear_in_base():
    base_families = {n.split("-")[0] for n in lookalike_classes("base")}
    assert {n.split("-")[0] for n in lookalike_classes("novel")} <= base_families
    assert base_families == set(FAMILIES)


def test_render_is_deterministic_and_seed_dependent():
    a = render_lookalike("knife-011", 3, image_size=48, seed=7)
    b = render_lookalike("knife-011", 3, image_size=48, seed=7)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_lookalike("knife-011", 3, image_size=48, seed=8))
    assert not np.array_equal(a, render_lookalike("knife-011", 4, image_size=48, seed=7))


def test_dataset_indexing_matches_render_and_ignores_access_order():
    ds = LookalikeDataset("novel", images_per_class=5, image_size=32, seed=1)
    assert len(ds) == 50 and ds.targets[7] == 1
    late_first = ds[12][0]
    np.testing.assert_array_equal(ds[12][0], late_first)
    np.testing.assert_array_equal(late_first, render_lookalike(ds.classes[2], 2, 32, seed=1))


def test_cache_returns_equal_copies():
    ds = LookalikeDataset("val", images_per_class=2, image_size=32, cache=True)
    first = ds.load(1)
    first[:] = 0  # a caller writing into its copy must not change the cache
    assert ds.load(1).any()


def test_instances_of_a_class_vary():
    images = np.stack([render_lookalike("pen-101", i, 32) for i in range(8)]).astype(np.float32)
    assert images.std(axis=0).mean() > 20  # pose, colour and background change per instance


def test_bad_arguments():
    with pytest.raises(DataError, match="unknown look-alike split"):
        LookalikeDataset("train")
    with pytest.raises(DataError, match="unknown look-alike class"):
        render_lookalike("spoon-000", 0)


def test_contact_sheet_grid():
    sheet = contact_sheet(["tube-000", "tube-001"], per_class=3, image_size=32, label_width=40)
    assert sheet.shape == (64, 40 + 3 * 32, 3)
