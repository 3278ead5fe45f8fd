"""fewshot_lkca: few-shot, memory-lean on-device fine-tuning built on the LKCA operator.

Importing the package registers the `lkca_mobilenet` family with timm::

    import fewshot_lkca, timm
    model = timm.create_model('lkca_mobilenet', num_classes=5)

The import itself stays free of torch, so that the onnxruntime-only predictor (`fewshot_lkca.predict`) runs where
torch is absent or too slow to load: the models are registered as soon as timm is imported (or at once, when it
already is), and `create_backbone` / `list_backbones` load them on first use.
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = '0.1.0'
__all__ = ['create_backbone', 'list_backbones', '__version__']

_MODELS = f'{__name__}.models'


def _register_models(layers_ready: bool = False) -> None:
    if _MODELS in sys.modules:  # also true while models itself is importing timm: it finishes on its own
        return
    layers = sys.modules.get(f'{__name__}.layers')
    if not layers_ready and layers is not None and getattr(layers.__spec__, '_initializing', False):
        return  # timm was first imported by our layers, which models needs whole: layers registers at its end
    importlib.import_module(_MODELS)


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Runs `_register_models` right after timm's own import finishes (timm has no plugin discovery)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        if self in sys.meta_path:  # one-shot; also keeps the lookup below from finding this finder again
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec('timm')
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                del spec.loader.exec_module  # the loader is timm's own again
                _register_models()

            spec.loader.exec_module = exec_then_register
        return spec


if 'timm' in sys.modules:
    _register_models()
else:
    sys.meta_path.insert(0, _RegisterAfterTimm())


def __getattr__(name: str):
    if name in ('create_backbone', 'list_backbones', 'models'):
        _register_models()
        models = sys.modules[_MODELS]
        return models if name == 'models' else getattr(models, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
