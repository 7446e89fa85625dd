"""--hflip false: training batches use only the stored original orientation."""
import numpy as np

from preparation.readers import open_dataset
from train_gen.loader import TrainLoader
from train_gen.step_draws import BatchPlan


def _legacy(tmp_path, n=8):
    """Legacy .npy folders whose orientation 1 is the negation of orientation 0 (all values > 0)."""
    feats, labels = tmp_path / "f", tmp_path / "l"
    feats.mkdir(), labels.mkdir()
    for i in range(n):
        x = np.full((3, 4, 4), i + 1, dtype=np.float32)
        np.save(feats / f"{i}.npy", np.stack([x, -x]))
        np.save(labels / f"{i}.npy", np.array(i % 2))
    return feats, labels


def test_hflip_switch(tmp_path):
    feats, labels = _legacy(tmp_path)
    signs = {}
    for hflip in (True, False):
        ds = open_dataset(feature_path=feats, label_path=labels, hflip=hflip)
        loader = TrainLoader(ds, BatchPlan(4), seed=0, num_workers=0)
        xs = np.concatenate([loader.batch(s)[0].numpy() for s in range(20)])
        signs[hflip] = np.sign(xs[:, 0, 0, 0])
    assert (signs[False] > 0).all()  # originals only
    assert (signs[True] < 0).any() and (signs[True] > 0).any()  # both orientations drawn
