"""The ``fednano`` command: one front for the federation's jobs.

Each command is a thin shell over the package that owns the job (``shared`` for validation, ``simulation``
for the simulated world); heavy imports happen inside the command so ``fednano --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.command()
def validate(
    path: Path = typer.Argument(..., help="A site folder (episodes.csv, vitals.csv, site.toml) or a CSV file."),
    task: Path | None = typer.Option(None, "--task", help="task.toml of a generic tabular task."),
) -> None:
    """Check a site's files against the data contract; exit 1 naming file, column and rows if they fail."""
    from shared.task import TaskSpec, TaskSpecError
    from shared.validation import validate_site

    try:
        spec = TaskSpec.from_toml(task) if task is not None else None
    except TaskSpecError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    report = validate_site(path, spec)
    typer.echo(report.format(), err=not report.ok)
    raise typer.Exit(0 if report.ok else 1)


@app.command("simulate-data")
def simulate_data(
    clinics: int = typer.Option(5, "--clinics", min=1, max=200, help="Number of clinics (sites)."),
    seed: int = typer.Option(0, "--seed", help="World seed: the same seed writes the same bytes."),
    out: Path = typer.Option(Path("runs/sites"), "--out", help="Folder to write one site folder per clinic into."),
    patients_per_clinic: int | None = typer.Option(
        None, "--patients-per-clinic", min=1, help="Same size for every clinic (default: tens to hundreds)."),
) -> None:
    """Simulate clinics from the ground-truth world and write one valid site folder each."""
    from rich.console import Console
    from rich.table import Table

    from shared.validation import validate_site
    from simulation.clinics import generate_sites

    world = generate_sites(clinics, seed, out, patients_per_clinic)
    table = Table(title=f"{clinics} simulated clinics (seed {seed}) in {out}")
    for column in ("site", "patients", "episodes", "vitals rows", "formulations", "response", "grade≥3 tox", "valid"):
        table.add_column(column, justify="right")
    failed = False
    for clinic in world.clinics:
        report = validate_site(out / clinic.name)
        failed |= not report.ok
        s = report.summary
        table.add_row(clinic.name, str(s.get("n_patients")), str(s.get("n_episodes")), str(s.get("n_vitals")),
                      str(s.get("n_formulations")), _rate(s.get("response_rate")),
                      _rate(s.get("toxicity_grade3_rate")), "yes" if report.ok else "NO")
    Console().print(table)
    if failed:
        raise typer.Exit(1)


def _rate(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
