"""learn2learn episodes: reproducibility, support/query split, label remapping, errors, workers."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fewshot_lkca.data import DataError, DataWarning, EpisodeSampler, ImageDataset, LookalikeDataset, labelled_loader


class TinyDataset(ImageDataset):
    """Images whose pixels encode their index, with given per-class counts."""

    def __init__(self, counts, transform=None):
        self.classes = [f"class{c}" for c in range(len(counts))]
        self.targets = [c for c, n in enumerate(counts) for _ in range(n)]
        self.transform = transform

    def load(self, index):
        return np.full((4, 4, 3), index, dtype=np.uint8)


def _index_of(images) -> list[int]:
    return [int(x[0, 0, 0]) for x in images]


def test_episode_shapes_and_remapped_labels():
    sampler = EpisodeSampler(TinyDataset([10] * 8), n_way=5, k_shot=2, n_query=3, seed=0)
    episode = sampler.sample(0)
    assert episode.support_x.shape == (10, 4, 4, 3)
    assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert episode.query_y.tolist() == [c for c in range(5) for _ in range(3)]
    assert len(set(episode.class_names)) == 5


def test_class_names_match_the_samples():
    dataset = TinyDataset([10] * 8)
    episode = EpisodeSampler(dataset, n_way=5, k_shot=1, n_query=4, seed=3).sample(2)
    for images, labels in ((episode.support_x, episode.support_y), (episode.query_x, episode.query_y)):
        for index, label in zip(_index_of(images), labels.tolist(), strict=True):
            assert dataset.classes[dataset.targets[index]] == episode.class_names[label]


def test_support_and_query_are_disjoint():
    sampler = EpisodeSampler(TinyDataset([6] * 5), n_way=5, k_shot=3, n_query=3, seed=1)
    for i in range(20):
        plan = sampler.plan(i)
        assert not set(plan.support_idx) & set(plan.query_idx)
        assert len(set(plan.support_idx)) == 15 and len(set(plan.query_idx)) == 15


def test_episodes_are_reproducible_and_independent_of_call_order():
    dataset = TinyDataset([10] * 8)
    a = EpisodeSampler(dataset, n_way=3, k_shot=1, n_query=2, seed=5)
    b = EpisodeSampler(dataset, n_way=3, k_shot=1, n_query=2, seed=5)
    forward = [a.plan(i) for i in range(6)]
    backward = [b.plan(i) for i in reversed(range(6))][::-1]
    assert forward == backward
    assert a.plan(0) != a.plan(1)
    assert EpisodeSampler(dataset, n_way=3, k_shot=1, n_query=2, seed=6).plan(0) != forward[0]


def test_plan_matches_sample():
    sampler = EpisodeSampler(TinyDataset([10] * 8), n_way=4, k_shot=2, n_query=2, seed=0)
    plan, episode = sampler.plan(3), sampler.sample(3)
    assert _index_of(episode.support_x) == plan.support_idx
    assert _index_of(episode.query_x) == plan.query_idx
    assert episode.support_y.tolist() == plan.support_y and episode.class_names == plan.class_names


def test_global_random_state_is_left_alone():
    sampler = EpisodeSampler(TinyDataset([10] * 8), n_way=3, k_shot=1, n_query=1, seed=0)
    random.seed(123)
    expected = [random.random() for _ in range(3)]
    random.seed(123)
    sampler.sample(0)
    assert [random.random() for _ in range(3)] == expected


def test_small_class_error_names_class_and_counts():
    dataset = TinyDataset([10, 10, 3, 10])
    with pytest.raises(
        DataError,
        match=r"^1 of 4 classes have fewer than k_shot \+ n_query = 5 \+ 5 = 10 images: "
        r"'class2' has 3; lower --ways, --shots or --queries, or add images",
    ):
        EpisodeSampler(dataset, n_way=2, k_shot=5, n_query=5)


def test_small_classes_can_be_dropped():
    with pytest.warns(DataWarning, match="'class2' has 3"):
        sampler = EpisodeSampler(TinyDataset([10, 10, 3, 10]), n_way=3, k_shot=1, n_query=4, drop_small_classes=True)
    for i in range(10):
        assert "class2" not in sampler.plan(i).class_names


def test_too_few_classes_for_n_way():
    with pytest.raises(DataError, match="n_way=5 needs 5 classes .* only 3 of 3"):
        EpisodeSampler(TinyDataset([10] * 3), n_way=5, k_shot=1, n_query=1)


def test_transform_is_applied_and_stacked():
    sampler = EpisodeSampler(
        TinyDataset([5] * 4), n_way=2, k_shot=1, n_query=1, transform=lambda x: torch.from_numpy(x).float()
    )
    episode = sampler.sample(0)
    assert isinstance(episode.support_x, torch.Tensor) and episode.support_x.shape == (2, 4, 4, 3)


def test_labelled_loader_is_seeded():
    dataset = TinyDataset([4] * 3, transform=lambda x: torch.from_numpy(x))
    first = [y.tolist() for _, y in labelled_loader(dataset, 4, seed=1)]
    again = [y.tolist() for _, y in labelled_loader(dataset, 4, seed=1)]
    assert first == again and sorted(sum(first, [])) == dataset.targets


@pytest.mark.slow
def test_episodes_load_in_worker_processes():
    dataset = LookalikeDataset("novel", images_per_class=4, image_size=32)
    sampler = EpisodeSampler(dataset, n_way=5, k_shot=1, n_query=2, seed=0, num_episodes=4)
    loaded = list(DataLoader(sampler, batch_size=None, num_workers=2))
    assert len(loaded) == 4
    for i, episode in enumerate(loaded):
        expected = sampler.sample(i)
        np.testing.assert_array_equal(np.asarray(episode.support_x), expected.support_x)
        assert episode.class_names == expected.class_names
