"""The recipes shipped inside the package: ``kdt recipes``, and recipe names for ``kdt run NAME``.

They live in ``kdtoolkit/recipes/`` (the repository's top-level ``recipes/``
links there), so an installed kdtoolkit — editable or from a wheel — finds
them from any directory. A command's RECIPE argument is a file path; when no
such file exists and the argument is a bare name (no folder, no ``.toml``),
it names a shipped recipe.
"""

from __future__ import annotations

from pathlib import Path

from .errors import RecipeError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def packaged_recipes() -> list[dict[str, str]]:
    """Every shipped recipe: ``name`` (what ``kdt run NAME`` takes), ``description`` and ``path``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    out = []
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        try:
            description = str(tomllib.loads(path.read_text(encoding="utf-8")).get("description", ""))
        except (OSError, ValueError):
            description = ""
        out.append({"name": path.stem, "description": description, "path": str(path)})
    return out


def resolve_recipe(arg: Path) -> Path:
    """The recipe file a command's RECIPE argument names: the path itself when it exists,
    else the shipped recipe of that name.

    :raises RecipeError: for a bare name that is neither a file nor a shipped recipe.
    """
    arg = Path(arg)
    if arg.exists() or len(arg.parts) != 1 or arg.suffix:
        return arg  # a path: load_recipe reports a missing file
    shipped = RECIPES_DIR / f"{arg.name}.toml"
    if shipped.is_file():
        return shipped
    from .registry import suggest

    names = [r["name"] for r in packaged_recipes()]
    raise RecipeError(f"no recipe file '{arg}' and no shipped recipe of that name{suggest(arg.name, names)}; "
                      f"shipped: {', '.join(names) or 'none'} (kdt recipes lists them)", source=str(arg))
