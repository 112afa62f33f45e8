"""Stages 4 and 5 of address-llava. The modules here build, train, merge and convert LLaVA-1.5 with the
AddressCLIP tower (stage 4); `eval/` scores and benchmarks it; `apps/` holds the commands, the demo, chat
and the web demo."""

__version__ = "0.1.0"
