"""onnxruntime sessions, set up one way for every user: the exporter's checks, the predictor, the benchmarks.

torch-free: the device-side predictor imports it.
"""
import os

import numpy as np

__all__ = ['onnx_session', 'run_onnx']


def onnx_session(model: str | os.PathLike | bytes, threads: int = 0, *, optimization: str = 'all', spin: bool = True,
                 save_optimized: str | os.PathLike | None = None):
    """An onnxruntime CPU session (sequential execution) for a model file or its serialised bytes.

    Args:
        threads: Intra-op threads; 0 lets onnxruntime choose.
        optimization: 'all' (onnxruntime's default), 'basic' or 'none': graph optimisations at load.
        spin: Whether idle intra-op threads spin-wait (fast when the cores are free; set False on a busy machine,
            where spinning threads steal the cores from the work).
        save_optimized: Also write the graph onnxruntime runs (after its optimisations) to this file.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
    options.graph_optimization_level = {
        'all': ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 'basic': ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        'none': ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    if not spin:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=['CPUExecutionProvider'])


def run_onnx(session, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The first output of ``session`` on float32 N x C x H x W ``images``, ``batch`` images at a time."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])
