"""moelm as an lm-evaluation-harness model backend: `lm_eval --model moelm` runs any harness task on moelm's path.

Importing this module registers the backend under the name `moelm` (lm-eval 0.4 finds models only in its own
registry, so something must import it first): `moelm lm-eval --model moelm --model_args pretrained=DIR ...`
does that and hands the rest of the command line to lm-eval's own CLI; in Python, import this module and call
`lm_eval.simple_evaluate(model="moelm", model_args="pretrained=DIR,dtype=float32,batch_size=8", ...)`.

Model arguments: pretrained (a moelm or DeepSeek-V2/V3 directory, required), dtype (float32 | bfloat16 |
float16 | auto: the directory's own), batch_size (rows decoded together; default 8), device (auto | cpu |
cuda[:N]), seed (sampling seed of request i is seed + i; default 1234), compile (true: the compiled decode step,
static batches). Requests go through `moelm.eval.lm.EvalModel`, whose tokenisation, truncation and stop rules
are the `hf` backend's, so both backends give the same per-sample results on the same directory. Needs the
`lm-eval` extra (`pip install moelm[lm-eval]`).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401 - fills lm-eval's lazy registry first: it only does so while the registry is empty
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from moelm.devices import resolve_device
from moelm.eval.lm import EvalModel
from moelm.infer.text import TextGenerator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}
DEFAULT_MAX_GEN_TOKS = 256  # the hf backend's default when a task sets none
SUPPORTED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}


class BackendArgumentError(ValueError):
    """A --model_args value moelm cannot use (named in the message)."""


@register_model("moelm")
class MoelmLM(TemplateLM):
    """lm-eval's LM interface over a moelm EvalModel (see the module docstring)."""

    def __init__(
        self,
        pretrained: str,
        dtype: str = "float32",
        batch_size: int | str = 8,
        device: str = "auto",
        seed: int | str = 1234,
        compile: bool | str = False,  # noqa: A002 - the model_args key users type
        max_batch_size: int | None = None,  # lm-eval's CLI always passes it; rows are fixed by batch_size
        **unknown: Any,
    ) -> None:
        super().__init__()
        unknown = {key: value for key, value in unknown.items() if value is not None}
        if unknown:
            raise BackendArgumentError(
                f"moelm backend: unknown model_args {sorted(unknown)}; "
                "known: pretrained, dtype, batch_size, device, seed, compile"
            )
        if str(dtype) not in DTYPES:
            raise BackendArgumentError(f"moelm backend: dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
        if str(compile).lower() not in ("true", "false", "1", "0"):
            raise BackendArgumentError(f"moelm backend: compile={compile!r}; allowed: true, false")
        if not str(seed).isdigit():
            raise BackendArgumentError(f"moelm backend: seed={seed!r}; a non-negative integer")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise BackendArgumentError(f"moelm backend: batch_size={batch_size!r}; a positive integer ('auto' is not)")
        generator = TextGenerator.from_pretrained(pretrained, dtype=DTYPES[str(dtype)], device=resolve_device(device))
        if str(compile).lower() in ("true", "1"):
            generator.compile()
        self.evaluator = EvalModel(generator, int(batch_size))
        self.seed = int(seed)
        self.pretrained = str(pretrained)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MoelmLM:
        """As lm-eval's, except that a key given in --model_args wins over the CLI's own flag of the same name
        (lm-eval's --batch_size defaults to 1 and would otherwise clash with model_args' batch_size)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> MoelmLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI asks for cuda:0 unless told otherwise; its hf backend then falls back to the CPU too
            extra["device"] = "cpu"
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------ what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        eos = self.evaluator.generator.model.config.eos_token_id
        return int(eos) if eos is not None else self.evaluator.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.evaluator.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.evaluator.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.rstrip("/").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.evaluator.encode(string)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        return self.evaluator.loglikelihood_tokens([(context, continuation) for _, context, continuation in requests])

    # ------------------------------------------------------------------ the three request types
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.evaluator.loglikelihood_greedy([request.args for request in requests])
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        results = self.evaluator.loglikelihood_rolling([request.args[0] for request in requests])
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation settings, each group through the evaluator's generate."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(index)
        eos = self.evaluator.generator.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        outputs = [""] * len(requests)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until, max_new, temperature, top_p = self._generation_settings(kwargs, eos)
            texts = self.evaluator.generate(
                [requests[i].args[0] for i in indices], max_new, until, temperature, top_p, self.seed + indices[0]
            )
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def _generation_settings(self, kwargs: dict[str, Any], eos: str) -> tuple[list[str], int, float, float]:
        unsupported = sorted(set(kwargs) - SUPPORTED_GEN_KWARGS - {"max_new_tokens"})
        if unsupported:
            raise BackendArgumentError(
                f"moelm backend: generation_kwargs {unsupported} are not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_GEN_KWARGS))}"
            )
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if eos and eos not in until:
            until.append(eos)
        max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS)))
        sampling = bool(kwargs.get("do_sample", False)) or float(kwargs.get("temperature", 0.0)) > 0
        temperature = float(kwargs.get("temperature", 1.0 if sampling else 0.0)) if sampling else 0.0
        return until, max_new, temperature, float(kwargs.get("top_p", 1.0))


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the moelm backend registered (`moelm lm-eval ...`)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
