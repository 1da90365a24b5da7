"""`moemerge chat`: a terminal chat with a merged MoE that shows which experts wrote each answer.

It runs the same Engine as `moemerge serve` (moemerge/tools/engine.py), in-process and without FastAPI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from moemerge.interrupt import Stopped
from moemerge.tools.engine import Delta, Engine, Finished, RequestRefused, check_seed
from moemerge.tools.request_routing import RequestRouting, RoutingPlan, decision_text
from moemerge.tools.routing import EXPERT_COLORS

HELP = "/reset forgets the conversation, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer"


def expert_bar(routing: dict[str, Any], width: int = 40, which: str = "completion") -> Text:
    """One line: a stacked bar of the experts' shares (each share / top-k of the width), then name=share."""
    experts = routing["experts"]
    top_k = routing["top_k"]
    bar = Text()
    used = 0
    for i, (_name, shares) in enumerate(experts.items()):
        cells = round(shares[which] / top_k * width) if i < len(experts) - 1 else width - used
        cells = max(0, min(cells, width - used))
        bar.append("█" * cells, style=EXPERT_COLORS[i % len(EXPERT_COLORS)])
        used += cells
    bar.append("  ")
    for i, (name, shares) in enumerate(experts.items()):
        style = EXPERT_COLORS[i % len(EXPERT_COLORS)] + (" bold" if name == routing["top_expert"] else "")
        bar.append(f"{name} {shares[which]:.2f}", style=style)
        bar.append("  ")
    bar.append(f"(top-{top_k}: shares sum to {top_k})", style="dim")
    if routing.get("mode") == "request":
        chosen = ", ".join(f"{name} {weight:.2f}" for name, weight in routing["chosen"].items())
        bar.append(f"  request → {chosen} ({routing['decided_by']})", style="dim")
    return bar


def chat(
    out: Path,
    device: torch.device,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    console: Console | None = None,
    routing: RequestRouting | None = None,
) -> None:
    """Read a message, stream the answer token by token, show the experts' shares; until /quit or end of input.

    With request routing each answer runs on the experts decided from the conversation's user messages."""
    check_seed(seed)
    console = console or Console(highlight=False)
    engine = Engine.load(out, device, routing)
    console.print(
        f"[bold]{out}[/bold]: experts {', '.join(engine.names)} (top-{engine.top_k}, {_routing_line(engine.routing)}), "
        f"context {engine.context_length} tokens"
        + ("" if engine.has_chat_template else "; no chat template, using 'role: content' lines"),
        soft_wrap=True,
    )
    console.print(f"[dim]{HELP}[/dim]", soft_wrap=True)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    params = engine.params(temperature=temperature, max_tokens=max_tokens, seed=seed)
    while True:
        try:
            line = console.input("[bold cyan]you ›[/bold cyan] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            history = list(start)
            console.print("[dim]conversation forgotten[/dim]")
            continue
        if command in ("/help", "/?"):
            console.print(f"[dim]{HELP}[/dim]", soft_wrap=True)
            continue
        messages = [*history, {"role": "user", "content": line}]
        try:
            ids = engine.chat_ids(messages)
            engine.check(ids, params)
        except RequestRefused as exc:
            console.print(f"[red]error:[/red] {exc.message} (/reset starts over)", soft_wrap=True)
            continue
        plan = RoutingPlan(engine.routing, decision_text(messages))
        answer, final = _stream_answer(engine, ids, params, plan, console)
        history = [*messages, {"role": "assistant", "content": answer}]
        if final is not None:
            note = f"  {final.completion_tokens} tokens, {final.finish_reason}"
            console.print(expert_bar(final.routing).append(note, style="dim"), soft_wrap=True)


def _routing_line(settings: RequestRouting) -> str:
    if settings.mode == "token":
        return "token routing"
    forced = f", forced {', '.join(settings.experts)}" if settings.experts else ""
    return f"request routing top-{settings.top_k}, {settings.mixing} mixing{forced}"


def _stream_answer(
    engine: Engine, ids: list[int], params, plan: RoutingPlan, console: Console
) -> tuple[str, Finished | None]:
    """Prints the answer as it is generated; Ctrl-C stops it and keeps what was written."""
    console.print("[bold green]moe ›[/bold green] ", end="")
    pieces: list[str] = []
    final = None
    steps = engine.generate(ids, params, plan)
    try:
        for event in steps:
            if isinstance(event, Delta):
                pieces.append(event.text)
                console.out(event.text, end="", highlight=False)
                console.file.flush()
            else:
                final = event
    except KeyboardInterrupt as exc:
        steps.close()
        if isinstance(exc, Stopped):  # SIGTERM/SIGHUP end the chat, not just this answer
            raise
        console.print(" [dim](stopped)[/dim]", end="")
    console.print()
    return "".join(pieces), final
