"""S-SMKE losses: image-text contrastive (CLIP) and contrastive distillation against a teacher with a memory bank.

Objective (reference §3.2, thesis §1.5). One S-SMKE training step minimises

    L = L_KD + ½ (L_ITC(fc1 CLS) + L_ITC(output CLS))

``L_ITC`` is :class:`ContrastiveLoss`, the CLIP loss between the student's image and text vectors with a learnable
scale. ``L_KD`` is :class:`ContrastiveDistillationLoss`: the student's image vector and its text vector are each
classified, by cross-entropy over scaled cosine logits (fixed scale 1/0.07 in the recipe), to the frozen teacher's
image CLS ``Z`` of the same pair, against the other teacher vectors of the global batch and a FIFO memory bank of past
teacher vectors: ``L_KD = ½ (CE_i2i + CE_t2i)``. Validation uses ``L_KD`` without the bank (in-batch) and no ITC.

Distributed semantics (open_clip's "local loss + gather with grad"). Each of W ranks holds a local batch of B rows;
B must be equal on all ranks, as all_gather requires (use ``drop_last`` or a padding sampler). A rank compares its B
local queries against the keys of the whole global batch, gathered in rank order, so its positives sit at columns
``arange(B) + B * rank``, with the global rank. A rank's loss is the mean over its B rows, so the mean of the W rank
losses is the loss one process gets on the concatenated batch of B*W rows. Gradients: the backward of
:func:`gather_with_grad` sums what every rank sends to a slice, so a rank's feature gradient is the gradient of the
*sum* of the W rank losses, i.e. W times the single-process gradient of its rows; DDP then averages parameter
gradients over the W ranks, which makes the update exactly the single-process one. Teacher vectors are constants and
are gathered by :func:`gather_no_grad` (no backward communication).

Deliberate differences from the original EV-LP code (``src/modules/losses.py``):

* One process works. The original bank update only defined the gathered tensor when W > 1 and crashed for W = 1.
* Any batch and bank size. The original asserted ``bank_size % (B*W) == 0``; here writes wrap around the end of the
  bank, and a push larger than the bank keeps only its newest ``memory_bank_size`` vectors.
* No random initial bank. The original filled the bank with U[0,1)^D rows, normalised: nearly parallel vectors that
  are easy, meaningless negatives until overwritten (128 steps at global batch 512). Here only rows actually written
  (``bank_filled``) are candidates; the rest are masked out of the softmax.
* The bank survives a resume: contents, write pointer and fill count are persistent buffers in the state_dict (the
  original pointer was a plain attribute).
* Labels use the global rank (``dist.get_rank()``), not Lightning's local rank, which is wrong on several nodes.
* KD candidates are the *gathered* global batch + bank. The original memory-bank loss used the rank's *local* teacher
  vectors + bank (labels ``arange(B)``), so the other ranks' current teacher vectors were no negatives at all and the
  loss depended on how the batch was split over GPUs. With the gathered batch, W ranks compute exactly what one process
  computes on the concatenated batch, and the in-batch validation loss is the same function with the bank switched off.
* Logits are computed in float32 even under autocast (the bank softmax runs over 65k+ columns); float64 inputs
  stay float64 (the reference test of the whole step runs in float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_rank() -> int:
    return dist.get_rank() if _distributed() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """``(B, ...)`` on each of W ranks -> ``(W*B, ...)`` in rank order, differentiable; identity without W > 1.

    Backward sums the gradients all ranks computed for a slice and hands the sum to the rank that owns it.
    """
    if not _distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_with_grad` for constants (teacher targets): the result is detached, even without W > 1."""
    x = x.detach().contiguous()
    if not _distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def _local_labels(batch_size: int, device: torch.device, gather: bool = True) -> Tensor:
    # Row i of this rank's queries is row B*rank + i of the gathered keys (row i of its own keys without a gather).
    return torch.arange(batch_size, device=device) + (batch_size * _global_rank() if gather else 0)


def fp32_or_wider(x: Tensor) -> Tensor:
    """Half-precision tensors (autocast) in float32 for the loss math; float32 and float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scaled_logits(queries: Tensor, keys: Tensor, logit_scale: Tensor | float) -> Tensor:
    """``s * queries @ keys.T`` in float32 or wider, outside autocast (which would run the matmul in half precision)."""
    with torch.autocast(queries.device.type, enabled=False):
        return logit_scale * (fp32_or_wider(queries) @ fp32_or_wider(keys).T)


def _ce_and_acc(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return loss, acc


class ContrastiveLoss(nn.Module):
    """CLIP image-text contrastive loss over the global batch (local loss, features gathered with gradient)."""

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                sample_ids: Tensor | None = None, gather: bool = True) -> dict[str, Tensor]:
        """``(B, D)`` L2-normalised features and the exponentiated scale -> ``{loss, image_loss, text_loss, image_acc,
        text_acc}``; ``image_loss`` is image->text CE, ``text_loss`` text->image CE, accs are detached fractions.

        ``sample_ids`` (B,) integer, optional: the image each pair shows. Pairs of the global batch that show the same
        image as a query's own pair (another caption of that image) are then removed from its negatives: each
        query's candidates are its positive and the pairs of other images (retrieval fine-tuning, where a batch can
        hold several captions of one image).

        ``gather=False``: each process's batch alone (where every process holds the same whole batch, as in
        validation over shards, gathering would repeat every key W times)."""
        all_image = gather_with_grad(image_features) if gather else image_features  # (B*W, D)
        all_text = gather_with_grad(text_features) if gather else text_features  # (B*W, D)
        labels = _local_labels(image_features.shape[0], image_features.device, gather)  # (B,)

        logits_per_image = _scaled_logits(image_features, all_text, logit_scale)  # (B, B*W)
        logits_per_text = _scaled_logits(text_features, all_image, logit_scale)  # (B, B*W)
        if sample_ids is not None:
            all_ids = gather_no_grad(sample_ids) if gather else sample_ids  # (B*W,)
            same_image = sample_ids[:, None] == all_ids[None, :]  # (B, B*W), the relation is symmetric
            same_image[torch.arange(len(labels), device=labels.device), labels] = False  # keep the positives
            logits_per_image = logits_per_image.masked_fill(same_image, float("-inf"))
            logits_per_text = logits_per_text.masked_fill(same_image, float("-inf"))
        image_loss, image_acc = _ce_and_acc(logits_per_image, labels)
        text_loss, text_acc = _ce_and_acc(logits_per_text, labels)
        return {
            "loss": (image_loss + text_loss) / 2,
            "image_loss": image_loss,
            "text_loss": text_loss,
            "image_acc": image_acc,
            "text_acc": text_acc,
        }


class ContrastiveDistillationLoss(nn.Module):
    """Contrastive distillation of student image and text vectors to frozen-teacher vectors, with a FIFO memory bank.

    The bank holds the last ``memory_bank_size`` (G) gathered teacher vectors, float32, identical on every rank because
    every rank writes the same gathered tensor. Rows are written in order from row 0 with wrap-around, so until the bank
    is full the valid rows are exactly ``[0, bank_filled)``; after that all G are. ``memory_bank_size=0`` disables it.
    Bank state lives in persistent buffers: ``memory_bank (G, D)``, ``bank_pointer`` (next row to write) and
    ``bank_filled`` (rows written, at most G), both int64 0-d tensors on the bank's device, so the bank costs no
    host-device synchronisation.
    """

    def __init__(self, embed_dim: int, memory_bank_size: int = 65536):
        super().__init__()
        if memory_bank_size < 0:
            raise ValueError(f"memory_bank_size must be >= 0 (0 disables the bank), got {memory_bank_size}")
        self.embed_dim = embed_dim
        self.memory_bank_size = memory_bank_size
        self.register_buffer("memory_bank", torch.zeros(memory_bank_size, embed_dim))
        self.register_buffer("bank_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, memory_bank_size={self.memory_bank_size}"

    def forward(
            self,
            image_features: Tensor,
            text_features: Tensor,
            teacher_features: Tensor,
            logit_scale: Tensor | float,
            use_memory_bank: bool = True,
            update_memory_bank: bool | None = None,
            gather: bool = True,
    ) -> dict[str, Tensor]:
        """``(B, D)`` L2-normalised student image, student text and teacher vectors -> ``{loss, image_loss, text_loss,
        image_acc, text_acc}``.

        Candidates are the teacher vectors of the global batch (rank order) followed by the valid bank rows.
        ``update_memory_bank`` defaults to ``use_memory_bank and self.training``; the push happens after the loss, so a
        batch is never its own negative. ``gather=False``: this process's batch alone, as in :class:`ContrastiveLoss`.
        """
        if not image_features.shape == text_features.shape == teacher_features.shape:
            raise ValueError(
                f"student image {tuple(image_features.shape)}, student text {tuple(text_features.shape)} and teacher "
                f"{tuple(teacher_features.shape)} features must have the same (B, D) shape"
            )
        if image_features.shape[-1] != self.embed_dim:
            raise ValueError(f"features have D={image_features.shape[-1]}, the loss was built for {self.embed_dim}")
        if update_memory_bank is None:
            update_memory_bank = use_memory_bank and self.training
        has_bank = self.memory_bank_size > 0

        teacher = fp32_or_wider(gather_no_grad(teacher_features) if gather else teacher_features.detach())  # (B*W, D)
        labels = _local_labels(image_features.shape[0], image_features.device, gather)  # (B,)

        bank = None
        if use_memory_bank and has_bank:
            # The push below overwrites the bank in place before backward runs, and backward needs the rows used here:
            # give the matmul its own copy when we are about to push (MoCo clones its queue for the same reason).
            bank = self.memory_bank.clone() if update_memory_bank else self.memory_bank

        image_loss, image_acc = _ce_and_acc(self._candidate_logits(image_features, teacher, bank, logit_scale), labels)
        text_loss, text_acc = _ce_and_acc(self._candidate_logits(text_features, teacher, bank, logit_scale), labels)

        if update_memory_bank and has_bank:
            self._push(teacher)
        return {
            "loss": (image_loss + text_loss) / 2,
            "image_loss": image_loss,
            "text_loss": text_loss,
            "image_acc": image_acc,
            "text_acc": text_acc,
        }

    def _candidate_logits(
            self, queries: Tensor, teacher: Tensor, bank: Tensor | None, logit_scale: Tensor | float
    ) -> Tensor:
        logits = _scaled_logits(queries, teacher, logit_scale)  # (B, B*W)
        if bank is None:
            return logits
        # Rows not yet written must not act as negatives. Masking (instead of slicing to bank_filled rows) keeps the
        # shape static and reads the fill count on the device, so there is no .item() sync.
        unwritten = torch.arange(self.memory_bank_size, device=bank.device) >= self.bank_filled  # (G,)
        bank_logits = _scaled_logits(queries, bank, logit_scale).masked_fill(unwritten, float("-inf"))  # (B, G)
        return torch.cat([logits, bank_logits], dim=1)  # (B, B*W + G)

    @torch.no_grad()
    def _push(self, vectors: Tensor) -> None:
        """FIFO-write ``(N, D)`` gathered teacher vectors, exactly as N sequential single-row writes would."""
        size, n = self.memory_bank_size, vectors.shape[0]
        keep = min(n, size)  # of a push larger than the bank only the newest G vectors survive
        offsets = torch.arange(n - keep, n, device=self.bank_pointer.device)  # (keep,)
        rows = (self.bank_pointer + offsets) % size  # distinct, since keep <= G
        self.memory_bank.index_copy_(0, rows, vectors[n - keep:].to(self.memory_bank.dtype))
        self.bank_pointer.add_(n).remainder_(size)
        self.bank_filled.add_(n).clamp_(max=size)
