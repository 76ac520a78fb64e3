"""The recipes shipped inside the package: ``kdt recipes``, and recipe names for ``kdt run NAME``.

They live in ``kdtoolkit/recipes/`` (the repository's top-level ``recipes/``
links there), so an installed kdtoolkit — editable or from a wheel — finds
them from any directory. Recipes in sub-folders are named by their path
without ``.toml``: ``paper/cars_resnet50_resnet18``. A command's RECIPE
argument is a file path; when no such file exists and the argument has no
``.toml`` suffix, it names a shipped recipe.
"""

from __future__ import annotations

from pathlib import Path

from kdtoolkit.foundation.errors import RecipeError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def packaged_recipes() -> list[dict[str, str]]:
    """Every shipped recipe: ``name`` (what ``kdt run NAME`` takes), ``description`` and ``path``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    out = []
    # top-level recipes first, then those of each sub-folder (paper/...); one level only, as the
    # package data ships them (a data folder placed beside a recipe is never walked)
    for path in sorted(RECIPES_DIR.glob("*.toml")) + sorted(RECIPES_DIR.glob("*/*.toml")):
        try:
            description = str(tomllib.loads(path.read_text(encoding="utf-8")).get("description", ""))
        except (OSError, ValueError):
            description = ""
        name = path.relative_to(RECIPES_DIR).with_suffix("").as_posix()
        out.append({"name": name, "description": description, "path": str(path)})
    return out


def resolve_recipe(arg: Path) -> Path:
    """The recipe file a command's RECIPE argument names: the path itself when it exists,
    else the shipped recipe of that name (``proto2proto``, ``paper/cars_resnet50_resnet18``).

    :raises RecipeError: for a name that is neither a file nor a shipped recipe (a bare name, or
        one inside a folder of shipped recipes such as ``paper/``).
    """
    arg = Path(arg)
    if arg.exists() or arg.suffix == ".toml" or arg.is_absolute() or ".." in arg.parts:
        return arg  # a path: load_recipe reports a missing file
    shipped = RECIPES_DIR / f"{arg.as_posix()}.toml"
    if shipped.is_file():
        return shipped
    shipped_folder = len(arg.parts) > 1 and (RECIPES_DIR / arg.parts[0]).is_dir()
    if arg.suffix or not (len(arg.parts) == 1 or shipped_folder):
        return arg
    from kdtoolkit.plugin.registry import suggest

    names = [r["name"] for r in packaged_recipes()]
    # a name without its folder ('cars_resnet50_resnet18') is compared with the shipped names' last part too
    by_stem = {n.rsplit("/", 1)[-1]: n for n in names if "/" in n}
    hint = suggest(arg.as_posix(), names)
    if not hint and arg.name in by_stem:
        hint = f" (did you mean '{by_stem[arg.name]}'?)"
    raise RecipeError(
        f"no recipe file '{arg}' and no shipped recipe of that name{hint}; "
        f"shipped: {', '.join(names) or 'none'} (kdt recipes lists them)",
        source=str(arg),
    )
