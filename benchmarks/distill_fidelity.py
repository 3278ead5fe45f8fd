"""Fidelity to the ImageNet teacher on photos that distillation never saw: scikit-image's and matplotlib's bundled
photos (astronaut, coffee, rocket, a motorcycle, a retina, the Hubble deep field, Grace Hopper, ...), each as its
centre crop and ``--views - 1`` seeded random crops (a third of the area or more), at 224 px.

    python -m benchmarks.distill_fidelity [--checkpoint PATH] [--views 32] [--json FILE]

Per model: top-1 agreement with the teacher (95 % CI over the views), the teacher's top-1 inside the model's top 5,
and the mean cosine of the pre-logits features. Rows: the transplant as ``--weights imagenet`` gives it (symmetric
padding), the transplant with TF padding, the distilled photo checkpoint (shipped, or ``--checkpoint``), and the SE
twin with TF padding (an exact copy of the teacher: 100 % by construction, a check of the measurement).
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine
from fewshot_lkca.checkpoint import load_checkpoint
from fewshot_lkca.metrics import mean_ci
from fewshot_lkca.models import create_backbone
from fewshot_lkca.pretrain.distill import PhotoPool, fidelity, view_crops
from fewshot_lkca.pretrain.teachers import TeacherInput, load_teacher
from fewshot_lkca.weights import SHIPPED

SHARED = Path(__file__).resolve().parents[2] / 'shared'
SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'stereo_motorcycle', 'hubble_deep_field',
                  'immunohistochemistry', 'retina', 'camera', 'moon', 'coins', 'grass', 'gravel', 'brick', 'clock')
MATPLOTLIB_PHOTOS = ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png')


def test_photos() -> PhotoPool:
    """The bundled photos as RGB uint8 arrays (gray ones repeated over 3 channels)."""
    os.environ.setdefault('SKIMAGE_DATADIR', str(Path.home() / '.cache' / 'scikit-image-offline'))
    import matplotlib
    from skimage import data

    from fewshot_lkca.images import load_image

    arrays, names = [], []
    for name in SKIMAGE_PHOTOS:
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        arrays.append(np.ascontiguousarray(image.astype(np.uint8)))
        names.append(f'skimage/{name}')
    for name in MATPLOTLIB_PHOTOS:
        arrays.append(load_image(Path(matplotlib.get_data_path()) / 'sample_data' / name))
        names.append(f'matplotlib/{name}')
    return PhotoPool(arrays, names)


def _distilled(path: str) -> torch.nn.Module:
    """The distilled checkpoint with its ImageNet classifier (a backbone load drops it)."""
    tensors, meta = load_checkpoint(path)
    model = create_backbone(meta['model'], **meta.get('model_args', {}))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', default=str(SHIPPED['photos'].path), help='the distilled model')
    parser.add_argument('--views', type=int, default=32, help='views per photo (the first is the centre crop)')
    parser.add_argument('--shared', type=Path, default=SHARED)
    parser.add_argument('--json', type=Path, help='write the records to this JSON file')
    args = parser.parse_args(argv)
    source = args.shared / 'weights' / 'tf_mobilenetv3_small_100.in1k.pth'
    if not source.is_file():
        raise SystemExit(f'needs the teacher weights {source} (../shared)')
    teacher = load_teacher('tf_mobilenetv3_small_100', str(source))
    pool = test_photos()
    views = view_crops(pool, teacher.pretrained_cfg, 224, args.views, seed=0)
    rows = {
        'transplant (--weights imagenet, symmetric padding)': lambda: create_backbone('lkca_mobilenet', weights=source),
        "transplant, pad_type='same'": lambda: create_backbone('lkca_mobilenet', weights=source, pad_type='same'),
        f'distilled ({Path(args.checkpoint).name})': lambda: _distilled(args.checkpoint),
        "lkca_mobilenet_se, pad_type='same' (the teacher itself)": lambda: create_backbone(
            'lkca_mobilenet_se', weights=source, pad_type='same'),
    }
    meta = dict(machine(), photos=len(pool), views=len(views), teacher='tf_mobilenetv3_small_100')
    print(f'# {meta}')
    print('| model | top-1 agreement | teacher top-1 in top-5 | feature cosine |\n|---|---|---|---|')
    records = []
    for label, build in rows.items():
        model = build().eval()
        same = TeacherInput(model.pretrained_cfg, teacher.pretrained_cfg, 224)
        with torch.inference_mode():
            result = fidelity(model, teacher, same, torch.nn.Identity(), views)
        agreement = mean_ci(result.pop('per_view'))
        print(f"| {label} | {agreement} | {100 * result['top5']:.1f} % | {result['cosine']:.3f} |", flush=True)
        records.append(dict(meta, model=label, agreement=agreement.as_dict(), top5=result['top5'],
                            cosine=result['cosine']))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + '\n')


if __name__ == '__main__':
    main()
