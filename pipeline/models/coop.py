"""CoOp (Zhou et al., 2022; the paper's Table A.4): learnable context vectors in front of the class-name
tokens in CLIP's text tower; the tower itself stays frozen."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.settings import FinetuneSettings
from pipeline.models.classifier import TextRowsHead, cosine_scores

_F = FinetuneSettings.defaults()  # the defaults


class CoOpHead(TextRowsHead):
    """Head rows = CLIP text embeddings of "[SOS] ctx_1 .. ctx_n <class name>. [EOS]", where the n context
    vectors are trained (with the video side, at their own lr) and every weight of the text tower is frozen.

    The prompt is tokenised with n placeholder words whose embeddings are replaced by the context vectors;
    the rest is open_clip's ``encode_text`` (positions, transformer, final norm, EOS pooling, projection).
    """

    def __init__(self, clip_model: nn.Module, tokenizer, class_names: list[str], n_ctx: int = _F.coop_ctx,
                 logit_scale: float = 4.6052) -> None:
        super().__init__()
        clip_model.visual = nn.Identity()  # the visual tower lives in the video model
        for param in clip_model.parameters():
            param.requires_grad_(False)
        self.text = clip_model
        self.tokenizer, self.n_ctx = tokenizer, n_ctx
        width = clip_model.token_embedding.weight.shape[1]
        self.ctx = nn.Parameter(torch.empty(n_ctx, width).normal_(std=0.02))  # CoOp's initialisation
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.register_buffer("tokens", self._tokens(class_names), persistent=False)

    def _tokens(self, class_names: list[str]) -> torch.Tensor:
        tokens = self.tokenizer([" ".join(["X"] * self.n_ctx) + f" {name}." for name in class_names])
        if int(tokens.argmax(dim=-1).min()) <= self.n_ctx:  # the EOS must come after the context and a name
            raise ValueError(f"{self.n_ctx} context vectors leave no room for the class names in the text "
                             f"tower's {tokens.shape[1]} tokens")
        return tokens

    def set_classes(self, class_names: list[str]) -> None:
        """The learned context in front of other class names (zero-shot on another dataset)."""
        self.tokens = self._tokens(class_names).to(self.tokens.device)
        self._rows = None

    def class_embeddings(self) -> torch.Tensor:
        t = self.text
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(self.tokens).to(cast)
        ctx = self.ctx.to(cast).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx:]], dim=1)
        x = x + t.positional_embedding.to(cast)
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask))
        x = x[torch.arange(x.shape[0], device=x.device), self.tokens.argmax(dim=-1)]
        if isinstance(t.text_projection, nn.Linear):
            return t.text_projection(x)
        return x @ t.text_projection

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        rows = self.class_embeddings().float() if self.training else self.weight
        return cosine_scores(video, rows, self.logit_scale)
