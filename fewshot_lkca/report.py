"""The end of a fine-tuning run: held-out evaluation, metrics, pictures and the summary lines it prints."""
import torch

from .config import FinetuneConfig
from .heads import FewShotClassifier
from .metrics import confused_pairs, mean_ci, query_episode_accuracies
from .rundir import CONFUSION_FILE, CURVE_FILE, LOG_FILE, RunDir
from .task import Task, load_images

__all__ = ['predict_pool', 'evaluate_task', 'task_line', 'plot_run', 'summary']


@torch.no_grad()
def predict_pool(model: FewShotClassifier, task: Task, eval_tf, batch_size: int,
                 progress: bool = False) -> torch.Tensor:
    """The model's class for each held-out image of the task, ``batch_size`` images at a time."""
    from tqdm.auto import tqdm

    model.eval()
    preds = [torch.zeros(0, dtype=torch.long)]
    for i in tqdm(range(0, len(task.pool_idx), batch_size), desc='evaluating', disable=not progress, unit='batch'):
        preds.append(model(load_images(task.dataset, task.pool_idx[i:i + batch_size], eval_tf)).argmax(1))
    return torch.cat(preds)


def evaluate_task(model: FewShotClassifier, task: Task, cfg: FinetuneConfig, eval_tf, progress: bool) -> dict:
    """metrics.json of an episodic run: ``eval_episodes`` query draws from the held-out images."""
    pred = predict_pool(model, task, eval_tf, cfg.eval_batch_size, progress)
    truth = torch.tensor(task.pool_y)
    correct = pred == truth
    accs = query_episode_accuracies(correct, truth, cfg.n_way, cfg.n_query, cfg.eval_episodes, cfg.seed)
    confusion = torch.zeros(cfg.n_way, cfg.n_way, dtype=torch.long)
    confusion.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
    per_class = {name: (confusion[c, c] / confusion[c].sum()).item() for c, name in enumerate(task.class_names)}
    return dict(
        task=dict(n_way=cfg.n_way, k_shot=cfg.k_shot, n_query=cfg.n_query, classes=task.class_names,
                  data=cfg.data, split=cfg.split, seed=cfg.seed),
        query_accuracy=accs[0].item(),
        episodes=mean_ci(accs).as_dict(),
        held_out_accuracy=correct.float().mean().item(),
        per_class_accuracy=per_class,
        most_confused=confused_pairs(confusion, task.class_names),
        confusion=confusion.tolist(),
        chance=1.0 / cfg.n_way,
    )


def task_line(cfg: FinetuneConfig, task: Task) -> str:
    """The first line of a run: which classes and images train, and which are held out."""
    if task.protocol == 'all':
        counts = torch.bincount(torch.tensor(task.support_y), minlength=len(task.class_names)).tolist()
        return (f'data: every class and image of {cfg.data} ({task.layout}): {len(task.class_names)} classes, '
                f'{sum(counts)} training images ({min(counts)}-{max(counts)} per class)'
                + (f', {len(task.pool_idx)} val images' if task.pool_idx else ''))
    return (f'task: {cfg.n_way}-way {cfg.k_shot}-shot on {cfg.data} ({cfg.split}): {", ".join(task.class_names)}; '
            f'{len(task.pool_idx)} held-out images')


def plot_run(run: RunDir, metrics: dict, names: list[str], log) -> None:
    from .plots import plot_confusion, plot_training_curve

    if not plot_confusion(metrics['confusion'], names, run.path(CONFUSION_FILE)):
        log('matplotlib is not installed: no PNGs (pip install fewshot-lkca[plots])')
    elif run.path(LOG_FILE).is_file():
        plot_training_curve(run.path(LOG_FILE), run.path(CURVE_FILE))


def summary(metrics: dict, cfg: FinetuneConfig, run: RunDir, log) -> None:
    log('')
    if 'estimate' in metrics:
        log(_estimate_line(metrics, cfg))
    else:
        ep = metrics['episodes']
        log(f'{cfg.n_way}-way {cfg.k_shot}-shot, {cfg.method}: accuracy {100 * ep["mean"]:.1f} +- '
            f'{100 * ep["ci95"]:.1f} % (95% CI over {ep["n"]} episodes of {cfg.n_query} queries/class; chance '
            f'{100 * metrics["chance"]:.0f} %)')
    if not metrics['per_class_accuracy']:
        log(f'run directory: {run.root} (metrics.json, model.safetensors)')
        return
    worst = min(metrics['per_class_accuracy'].items(), key=lambda kv: kv[1])
    log(f'hardest class: {worst[0]} ({100 * worst[1]:.0f} %)'
        + (f'; most confused: {metrics["most_confused"][0]["true"]} -> {metrics["most_confused"][0]["predicted"]}'
           if metrics['most_confused'] else ''))
    typical = _typical_accuracy(cfg, metrics['weights'])
    if typical:
        log(typical)
    log(f'run directory: {run.root} (metrics.json, model.safetensors, confusion.png)')


def _estimate_line(metrics: dict, cfg: FinetuneConfig) -> str:
    est, counts = metrics['estimate'], metrics['task']['training_images']
    trained = f'{len(counts)} classes, {sum(counts.values())} training images, {cfg.method}'
    if not est['images']:
        return f'{trained}: no accuracy estimate (no class has two images to hold one out)'
    low, high = est['ci95']
    return (f'{trained}: estimated accuracy {100 * est["accuracy"]:.1f} % (95% interval {100 * low:.0f}-'
            f'{100 * high:.0f} %; {est["description"]}; chance {100 * metrics["chance"]:.0f} %)')


# What the job's defaults are measured with: when these match, the model card's figure over many tasks applies.
_RECIPE_FIELDS = ('method', 'steps', 'lr', 'head_lr_scale', 'frozen_groups', 'train_params', 'batch_size',
                  'accumulate', 'optimizer', 'augment', 'guard', 'n_way', 'split', 'data', 'model')


def _typical_accuracy(cfg: FinetuneConfig, origin: str) -> str:
    """One line with the default recipe's mean over many tasks (shipped model card), so one draw is not read as the
    recipe's quality; empty when the run is not the measured setting."""
    from .weights import SHIPPED, model_card

    entry, card = SHIPPED.get(cfg.data), model_card(cfg.data)
    if not card or entry is None or str(entry.path) not in origin:
        return ''
    defaults = FinetuneConfig()
    measured = (card.get('default_recipe') or {}).get(str(cfg.k_shot))
    if not measured or any(getattr(cfg, f) != getattr(defaults, f) for f in _RECIPE_FIELDS):
        return ''
    return (f"this task is one draw: the same recipe averaged {100 * measured['mean']:.1f} +- "
            f"{100 * measured['ci95']:.1f} % over {measured['tasks']} {measured['split']} tasks (model card)")
