"""Package-level promises: a light import, registration on import."""
import subprocess
import sys

# What our optional features need; `import fewshot_lkca` must not pay for any of them.
HEAVY = ('learn2learn', 'albumentations', 'cv2', 'onnx', 'onnxruntime', 'onnxscript', 'matplotlib', 'gym',
         'executorch')


def _imported_modules(statement: str) -> set[str]:
    code = f'import sys\n{statement}\nprint("\\n".join(sys.modules))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_is_light_and_registers_models():
    timm_alone = _imported_modules('import timm')
    ours = _imported_modules("import fewshot_lkca, timm\nassert timm.is_model('lkca_mobilenet')")
    extra_top_level = {m.split('.')[0] for m in ours - timm_alone}
    assert extra_top_level <= {'fewshot_lkca'}, f'import fewshot_lkca pulled in: {sorted(extra_top_level)}'
    assert not {m for m in HEAVY if m in timm_alone}, 'timm itself now imports one of HEAVY: recheck this test'


def test_models_register_whatever_the_import_order():
    # The package import loads no torch (the predictor runs without it), so registration rides on timm's import;
    # importing our layers first imports timm from inside them, which must not leave the models unregistered.
    orders = ['import fewshot_lkca, timm', 'import timm, fewshot_lkca',
              'from fewshot_lkca.layers import LKCA; import timm',
              'from fewshot_lkca.layers.lkca import LKCA; import timm',
              'from fewshot_lkca.data import eval_transform; import timm']
    for statement in orders:
        _imported_modules(f"{statement}\nassert timm.is_model('lkca_mobilenet'), {statement!r}")
    assert 'torch' not in _imported_modules('import fewshot_lkca')
