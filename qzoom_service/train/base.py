"""Train the base model itself (trunk, vision tower and LM head) on visual QA, for models built from scratch.

Q-Zoom's stages 1 and 3 assume a Qwen2.5-VL that already answers questions. The project's small embedded
model has none to start from, so this stage teaches it on two kinds of sequences, exactly as the engine
will later feed them:

- **coarse**: the chat prompt with the image at the coarse budget, then the answer;
- **fused**: the same prompt with `<|vision_start|> RoI <|vision_end|>` spliced in after the coarse image
  (`zoom.splice_roi`, M-RoPE positions aligned by the checkpoint's scheme), the RoI being the crop of the
  ORIGINAL image over the merged-grid cells that cover the target box, re-encoded at the same budget —
  what a perfect SD-RPN would hand the engine.

The loss is next-token cross-entropy on the answer tokens and the closing `<|im_end|>`, plus, with a
`BoxLocator`, an auxiliary BCE that marks the target's grid cells on the coarse image tokens at the input of
layer K (what the SD-RPN twig reads). A batch is one
padded forward: sequences are right-padded, so causal attention alone keeps padding out of every real
token's view and no attention mask is needed. Every sample (scene, question, budget, fused or not) derives
from its index and the seed, so a resumed run replays the same batches.
"""

from __future__ import annotations

import json
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..coarse import embed_prompt, rope_positions
from ..errors import InvalidInput
from ..preprocess import preresize
from ..released import BRANCH_KEYS
from ..rpn import cell_box_to_original, original_to_cell_box
from ..synthetic import stable_seed
from ..zoom import encode_crop, splice_roi
from .checkpoint import atomic_dir
from .loop import TrainConfig, fit, plan_batches, plan_digest

__all__ = ["BaseExample", "BoxLocator", "make_example", "batch_loss", "train_base", "save_base"]


@dataclass
class BaseExample:
    """One training sequence before embedding. `crop` is (pixel_values, grid_thw, cell_box) or None."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    input_ids: torch.Tensor  # (L,) prompt + answer + <|im_end|>
    answer_len: int  # tokens scored at the end of input_ids (answer + <|im_end|>)
    crop: tuple | None = None
    target_cells: torch.Tensor | None = None  # (Nv,) 1.0 on the coarse cells the target box touches, else 0.0


def make_example(processor, image, question: str, answer: str, budget_tokens: int,
                 zoom_box=None, locate_box=None) -> BaseExample:
    """Encode `image` at exactly `budget_tokens` (the engine's min = max budget) and, with `zoom_box`
    (original pixels), the crop over the grid cells that box touches, at the same budget. `locate_box`
    (original pixels) gives the `BoxLocator` its target cells."""
    pixels = budget_tokens * processor.factor**2
    pixel_values, grid = processor.encode_image(preresize(image, processor.factor), pixels, pixels)
    hm, wm = int(grid[0, 1]) // processor.merge_size, int(grid[0, 2]) // processor.merge_size
    prompt = processor.prompt_ids(question, hm * wm)[0]
    end = processor.token_id("<|im_end|>")
    answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
    ids = torch.cat([prompt, torch.tensor(answer_ids, dtype=torch.long)])
    crop = None
    if zoom_box is not None:
        cell_box = original_to_cell_box(zoom_box, (hm, wm), image.size)
        box = cell_box_to_original(cell_box, (hm, wm), image.size, factor=processor.factor)
        encoded = encode_crop(processor, image, box, pixels, pixels)
        if encoded is None:
            raise InvalidInput(f"zoom box {zoom_box} gives a crop under {processor.factor} px on {image.size}")
        crop = (*encoded, cell_box)
    target_cells = None
    if locate_box is not None:
        cx0, cy0, cx1, cy1 = original_to_cell_box(locate_box, (hm, wm), image.size)
        cells = torch.zeros(hm, wm)
        cells[cy0:cy1, cx0:cx1] = 1.0
        target_cells = cells.flatten()
    return BaseExample(pixel_values, grid, ids, len(answer_ids), crop, target_cells)


class BoxLocator(nn.Module):
    """Auxiliary head for base training: one logit per coarse image token at the input of trunk layer `layer`,
    trained with BCE (foreground weighted `pos_weight`) to mark the cells the target box touches.

    Not part of Q-Zoom and never saved: it shapes the trunk so that h_K says where a small target is. A trunk
    trained only to answer needs no such signal when the RoI is always handed to it, and then the SD-RPN,
    which reads h_K with the trunk frozen, has nothing to find the target by. `last` holds the latest batch's
    locator loss and the share of examples whose top cell is a target cell (for progress logs).
    """

    def __init__(self, hidden_size: int, layer: int, weight: float = 1.0, pos_weight: float = 10.0):
        super().__init__()
        self.layer, self.weight, self.pos_weight = layer, weight, pos_weight
        self.head = nn.Linear(hidden_size, 1)
        self.last: dict[str, float] = {}

    def loss(self, hidden_k: torch.Tensor, examples: list[BaseExample], image_token_id: int) -> torch.Tensor:
        """Pooled BCE over the target cells of every example that has them; hidden_k (B, L, D)."""
        logits, labels, hits = [], [], 0
        for i, ex in enumerate(examples):
            if ex.target_cells is None:
                continue
            slots = (ex.input_ids == image_token_id).nonzero()[:, 0].to(hidden_k.device)
            row = self.head(hidden_k[i, slots]).squeeze(-1).float()
            target = ex.target_cells.to(row.device)
            hits += bool(target[int(row.argmax())] > 0)
            logits.append(row)
            labels.append(target)
        if not logits:
            return hidden_k.new_zeros(())
        located = len(logits)
        logits, labels = torch.cat(logits), torch.cat(labels)
        weight = torch.tensor(self.pos_weight, device=logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
        self.last = {"loss": float(loss.detach()), "peak_hit": hits / located}
        return loss


def _vision(model, examples: list[BaseExample]) -> tuple[list, list]:
    """One vision-tower call for every image of the batch (with gradients) -> coarse and RoI embeddings."""
    pixels, grids = [], []
    for ex in examples:
        pixels.append(ex.pixel_values)
        grids.append(ex.grid_thw)
        if ex.crop is not None:
            pixels.append(ex.crop[0])
            grids.append(ex.crop[1])
    visual = model.model.visual
    grid = torch.cat(grids).to(visual.device)
    merged = visual(torch.cat(pixels).to(device=visual.device, dtype=visual.dtype), grid_thw=grid).pooler_output
    parts = iter(torch.split(merged, (grid.prod(-1) // model.config.vision_config.spatial_merge_size**2).tolist()))
    coarse, roi = [], []
    for ex in examples:
        coarse.append(next(parts))
        roi.append(next(parts) if ex.crop is not None else None)
    return coarse, roi


def _sequence(model, ex: BaseExample, coarse_embeds, roi_embeds, reuse_src_pos: bool):
    """(embeds (L, D), positions (3, L) float32) of one coarse or fused sequence."""
    device = model.model.language_model.embed_tokens.weight.device
    ids = ex.input_ids[None].to(device)
    x = embed_prompt(model, ids, [coarse_embeds])
    pos = rope_positions(model, ids, ex.grid_thw.to(device))
    if roi_embeds is None:
        return x[0], pos[:, 0].float()
    merge = model.config.vision_config.spatial_merge_size
    hw = (int(ex.grid_thw[0, 1]) // merge, int(ex.grid_thw[0, 2]) // merge)
    roi_hw = (int(ex.crop[1][0, 1]) // merge, int(ex.crop[1][0, 2]) // merge)
    start = int((ids[0] == model.config.image_token_id).nonzero()[0, 0])
    zin = splice_roi(x, pos, start, roi_embeds, hw, roi_hw, ex.crop[2], reuse_src_pos)
    return zin.embeds[0], zin.positions[:, 0].float()


def batch_loss(model, examples: list[BaseExample], reuse_src_pos: bool,
               locator: BoxLocator | None = None) -> tuple[torch.Tensor, float]:
    """Mean answer-token cross-entropy over the batch (one right-padded forward), plus the weighted
    `locator` loss when given, and the fraction of answers whose every token is the argmax."""
    coarse, roi = _vision(model, examples)
    seqs = [_sequence(model, ex, c, r, reuse_src_pos) for ex, c, r in zip(examples, coarse, roi)]
    length = max(x.shape[0] for x, _ in seqs)
    dim = seqs[0][0].shape[1]
    x = seqs[0][0].new_zeros(len(seqs), length, dim)
    pos = torch.zeros(3, len(seqs), length, dtype=torch.float32, device=x.device)
    targets = torch.full((len(seqs), length), -100, dtype=torch.long, device=x.device)
    for i, ((xi, pi), ex) in enumerate(zip(seqs, examples)):
        n = xi.shape[0]
        x[i, :n], pos[:, i, :n] = xi, pi
        # Token t predicts token t+1: the answer's tokens are the last `answer_len` of the sequence.
        targets[i, n - ex.answer_len - 1 : n - 1] = ex.input_ids[-ex.answer_len:].to(x.device)
    out = model.model.language_model(inputs_embeds=x, position_ids=pos, use_cache=False,
                                     output_hidden_states=locator is not None)
    scored = targets != -100
    logits = model.lm_head(out.last_hidden_state[scored])
    loss = F.cross_entropy(logits.float(), targets[scored])
    if locator is not None:  # hidden_states[k] is the input of layer k (index 0: the embeddings)
        loss = loss + locator.weight * locator.loss(out.hidden_states[locator.layer], examples,
                                                    model.config.image_token_id)
    right = (logits.argmax(-1) == targets[scored]).float()
    per_answer = torch.split(right, [ex.answer_len for ex in examples])
    exact = sum(bool(r.all()) for r in per_answer) / len(examples)
    return loss, exact


_WORKER_EXAMPLE_FOR = None


def _worker_init(example_for) -> None:
    global _WORKER_EXAMPLE_FOR
    torch.set_num_threads(1)
    _WORKER_EXAMPLE_FOR = example_for


def _build(example_for, batch, seed: int) -> list[BaseExample]:
    """The examples of `batch`; each index gets its own seeded stream, so where it is built does not matter."""
    return [example_for(i, random.Random(stable_seed(seed, "example", i))) for i in batch]


def _build_batch(args) -> list[BaseExample]:
    batch, seed = args
    return [_to_numpy(ex) for ex in _build(_WORKER_EXAMPLE_FOR, batch, seed)]


def _convert(ex: BaseExample, fn) -> BaseExample:
    crop = None if ex.crop is None else (fn(ex.crop[0]), fn(ex.crop[1]), ex.crop[2])
    cells = None if ex.target_cells is None else fn(ex.target_cells)
    return BaseExample(fn(ex.pixel_values), fn(ex.grid_thw), fn(ex.input_ids), ex.answer_len, crop, cells)


def _to_numpy(ex: BaseExample) -> BaseExample:
    # Tensors would cross the process boundary as shared-memory file descriptors; thousands of those
    # exhaust the descriptor passing and hang the pool. Plain arrays travel as bytes through the pipe.
    return _convert(ex, lambda t: t.numpy())


def _from_numpy(ex: BaseExample) -> BaseExample:
    return _convert(ex, torch.from_numpy)


class _Examples:
    """Examples of the planned batches, in order; with workers, built ahead in forked processes (drawing
    and resizing full-size images costs as much as a training step on a CPU). At most `ahead` batches
    wait at a time: finished examples sit in shared memory until used, so unbounded read-ahead grows it
    without limit whenever the workers outpace training."""

    def __init__(self, example_for, batches, seed: int, workers: int, ahead: int = 4):
        self.example_for, self.batches, self.seed, self.workers = example_for, batches, seed, workers
        self.ahead = max(ahead, workers)
        self.pool, self.pending, self.position = None, [], None

    def __call__(self, batch) -> list[BaseExample]:
        if self.workers == 0:
            return _build(self.example_for, batch, self.seed)
        if self.pool is None:  # the first batch asked for is where this (possibly resumed) run starts
            self.position = next(n for n, b in enumerate(self.batches) if b is batch)
            self.pool = multiprocessing.get_context("fork").Pool(self.workers, _worker_init, (self.example_for,))
            self.queued = self.position
        if self.batches[self.position] is not batch:
            raise RuntimeError("batches requested out of plan order")
        while self.queued < len(self.batches) and self.queued < self.position + self.ahead:
            self.pending.append(self.pool.apply_async(_build_batch, ((self.batches[self.queued], self.seed),)))
            self.queued += 1
        self.position += 1
        return [_from_numpy(ex) for ex in self.pending.pop(0).get()]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def train_base(loaded, example_for: Callable[[int, random.Random], BaseExample], config: TrainConfig, *,
               pool: int, out_dir: str | Path | None = None, resume: bool = False, progress: bool = False,
               callback=None, workers: int = 0, locator: BoxLocator | None = None,
               stop_at: int | None = None) -> list:
    """Train every parameter of `loaded.model` (branches excluded) on examples 0..pool-1.

    With `locator`, its auxiliary loss joins the answer loss on examples that carry `target_cells`; the
    locator trains along (and is checkpointed for resume) but is not part of the model.

    `example_for(index, rng)` builds example `index`; `rng` is seeded from (config.seed, index), so the
    choice of budget, route or jitter it makes is reproducible. `workers` > 0 builds examples ahead in
    that many forked processes. `callback(step, loss, exact_match)` runs after each step. `stop_at` ends
    the run (with a checkpoint, when `out_dir` and `config.save_every` are set) after that many of the
    plan's `config.steps`, keeping their learning-rate schedule. Returns [(step, loss)] of this call.
    """
    if pool < 1:
        raise InvalidInput("the base-model training pool is empty")
    model = loaded.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    batches = plan_batches(lambda epoch: list(range(pool)), config.batch_size, config.epochs, config.steps,
                           config.seed)
    settings = {"role": "base", "pool": pool, "reuse_src_pos": loaded.checkpoint.reuse_src_pos,
                "plan": plan_digest(batches, lambda i: i)}
    if locator is not None:
        settings["locator"] = {"layer": locator.layer, "weight": locator.weight, "pos_weight": locator.pos_weight}
    examples = _Examples(example_for, batches, config.seed, workers)
    exact = []

    def step(batch):
        loss, hit = batch_loss(model, examples(batch), loaded.checkpoint.reuse_src_pos, locator)
        loss.backward()
        exact.append(hit)
        return float(loss.detach())

    def report(done, loss):
        if callback is not None:
            callback(done, loss, exact[-1])

    trunk = nn.ModuleDict({"model": model.model, "lm_head": model.lm_head})
    if locator is not None:
        locator.to(model.device).train()
        trunk["locator"] = locator
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    try:
        _, losses = fit(trunk, batches, step, config, settings, model.device, out_dir=out, resume=resume,
                        progress=progress, callback=report, stop_at=stop_at)
    finally:
        examples.close()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return losses


def save_base(loaded, out_dir: str | Path) -> Path:
    """Write the trained base model (no branches) as a Hugging Face checkpoint directory, atomically."""
    with atomic_dir(out_dir, "config.json") as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.processor.save_pretrained(tmp)
        drop_branch_keys(tmp / "config.json")
    return Path(out_dir)


def drop_branch_keys(config_json: Path) -> None:
    """Remove Q-Zoom branch keys from a config.json: a base checkpoint has no branch weights, and the
    loader would otherwise ask for them."""
    cfg = json.loads(config_json.read_text())
    for holder in (cfg, cfg.get("text_config") or {}):
        for key in BRANCH_KEYS:
            holder.pop(key, None)
    config_json.write_text(json.dumps(cfg, indent=2))
