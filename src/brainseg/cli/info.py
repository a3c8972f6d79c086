"""`brainseg info MODEL`: the model card of a .safetensors checkpoint or an .onnx file."""

from __future__ import annotations

from pathlib import Path

import typer

from brainseg import console

_HELP = (
    "Show MODEL's card: intended use and limits, training data and split, recipe, metrics "
    "with their protocol, preprocessing, licence, brainseg version.\n\n"
    "MODEL is a .safetensors checkpoint or an .onnx file (also on the Hugging Face Hub: "
    "hf://OWNER/NAME\\[@REVISION]\\[/FILE]; or a folder from export --hub-folder); torch is not "
    "needed for either. "
    "Fields follow the MONAI bundle metadata.json convention (docs/model-card.md).\n\n"
    "Example: brainseg info runs/train/exp/best.safetensors --json"
)


def register(app: typer.Typer) -> None:
    """Add the subcommand to the app."""

    @app.command("info", help=_HELP, no_args_is_help=True)
    def _cmd(
        model: Path = typer.Argument(
            ...,
            show_default=False,
            help="A .safetensors checkpoint, an .onnx file, a folder written by export "
            "--hub-folder, or hf://OWNER/NAME\\[@REVISION]\\[/FILE] on the Hugging Face Hub.",
        ),
        json_out: bool = typer.Option(
            False, "--json", help="Print the card as JSON on stdout and nothing else."
        ),
    ) -> None:
        from brainseg.model.card import card_rows, read_card
        from brainseg.model.hub import is_hub_ref, parse_ref

        card = read_card(model)
        shown = parse_ref(model) if is_hub_ref(model) else model  # hf:// (a Path reads hf:/)
        if json_out:
            console.emit_json(card)
            return
        table = console.table(
            f"{shown}: {card.get('name', 'brainseg model')}",
            ["section", "field", "value"],
            [list(r) for r in card_rows(card)],
        )
        for col in table.columns:
            col.justify = "left"
        table.columns[2].overflow = "fold"
        console.result(table)
