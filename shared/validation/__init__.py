"""Validation of a site's data — a folder (episodes.csv, vitals.csv, site.toml) or one task CSV — before use.

Why hand-written rather than pandera or ``pandas.read_csv`` with dtypes: the checks that matter most come
before any dataframe library sees the file. An empty file, an Excel workbook saved as ``.csv``, bytes that
are not UTF-8, a row cut off at the end, a row with an extra field or two columns with the same name are
silently padded, dropped, coerced or renamed by pandas. And every message must name the file, the column,
the data rows (with their line numbers), what was expected and, for the common unit mistakes, a hint
(``Column.hint_below`` / ``hint_above``) — so each cell is read as text and converted here, where we know
which cell failed.

The stages, each in its own module:

1. bytes → header and row positions (``reading.read_csv_table``): regular file, size, binary sniff, strict
   UTF-8, line length, header, ragged rows;
2. header → declared columns (``columns.check_header``): missing required columns, unknown extra columns;
3. text cells → values (``columns.parse_table``): dtype, missing where not nullable, range with unit hint;
4. cross-checks: duplicate episode ids, dose vs dose per m² × BSA, BSA vs Mosteller, one person per
   patient id (``episodes``); vitals references (``vitals``); site.toml and its privacy budget
   (``site_config``).

``site`` holds the entry points, ``task_site`` the generic tabular task, ``problems`` the findings and the
report, ``inspection`` the steps both kinds of site share (site.toml, one declared file, no link out of
the folder).

Files are streamed, never held whole, so time is linear in their size and memory stays near the typed
tables ``load_site`` returns; absurd shapes stop early at named limits (``MAX_FILE_BYTES``,
``MAX_LINE_BYTES``, ``MAX_COLUMNS``, ``MAX_ROWS``, ``MAX_SITE_TOML_BYTES``), and a finding about many
cells or columns is one problem that lists ``MAX_LISTED`` of them and counts the rest.

Validation never modifies a file and never raises on bad data: every finding becomes a ``Problem`` in the
``ValidationReport``. ``load_site`` validates first, then returns typed frames or raises ``SiteDataError``.

What may leave the site. Patient values and identifiers never do, not even inside an error message. So
every problem has two renderings:

- the full text (``str(problem)``, ``report.format()``, ``str(err)``), with the cell values, ids and local
  paths that help the site fix its files: for the site's own console and log and ``fednano validate``;
- the shareable text (``problem.shareable``, ``report.shareable_errors()``, ``report.shareable_warnings()``,
  ``report.format_shareable()``, ``err.shareable``, ``err.shareable_errors``): file name, column, row and
  line numbers, the rule that failed with its public expectation (range, unit, dtype, categories) and
  counts; no cell value, no identifier, no header name or site.toml key the contract does not declare, no
  local path. This is the only form a site's reply to the coordinator may carry.

A ``Problem`` built without a shareable text (by code outside this package) shares its location only.

The site's privacy settings are checked here too; ``privacy_shares(site.config)`` returns the ε shares per
phase the site declared in ``[privacy.shares]`` (see ``site_config``).

Example
-------
>>> report = validate_site("sites/alpha")              # doctest: +SKIP
>>> print(report.format())                             # doctest: +SKIP
>>> site = load_site("sites/alpha")                    # doctest: +SKIP
"""

from shared.validation.columns import MISSING_TOKENS, check_header, parse_column, parse_table
from shared.validation.episodes import (
    AGE_TOLERANCE_YEARS,
    BSA_TOLERANCE,
    DOSE_TOLERANCE,
    HEIGHT_TOLERANCE_CM,
    bsa_inconsistent_with_mosteller,
    dose_inconsistent_with_bsa,
    duplicate_episode_ids,
    mosteller_bsa_m2,
    patient_age_inconsistent,
    patient_height_inconsistent,
    patient_sex_inconsistent,
)
from shared.validation.problems import (
    MAX_ECHO_CHARS,
    MAX_LISTED,
    WITHHELD,
    Problem,
    Severity,
    SiteDataError,
    ValidationReport,
)
from shared.validation.reading import (
    BINARY_SIGNATURES,
    CHUNK_ROWS,
    MAX_COLUMNS,
    MAX_CONTROL_FRACTION,
    MAX_FILE_BYTES,
    MAX_LINE_BYTES,
    MAX_ROWS,
    SNIFF_BYTES,
    CsvTable,
    read_csv_table,
)
from shared.validation.site import SiteData, load_site, validate_site
from shared.validation.site_config import (
    MAX_DELTA,
    MAX_EPSILON,
    MAX_SITE_TOML_BYTES,
    PRIVACY_PHASES,
    SITE_CONFIG_KEYS,
    SUPPORTED_SCHEMA_VERSIONS,
    SiteConfigError,
    privacy_shares,
    read_site_config,
)
from shared.validation.task_site import task_columns
from shared.validation.vitals import vitals_without_episodes

__all__ = [
    "AGE_TOLERANCE_YEARS", "BINARY_SIGNATURES", "BSA_TOLERANCE", "CHUNK_ROWS", "DOSE_TOLERANCE",
    "HEIGHT_TOLERANCE_CM", "MAX_COLUMNS", "MAX_CONTROL_FRACTION", "MAX_DELTA", "MAX_ECHO_CHARS", "MAX_EPSILON",
    "MAX_FILE_BYTES", "MAX_LINE_BYTES", "MAX_LISTED", "MAX_ROWS", "MAX_SITE_TOML_BYTES", "MISSING_TOKENS",
    "PRIVACY_PHASES", "SITE_CONFIG_KEYS", "SNIFF_BYTES", "SUPPORTED_SCHEMA_VERSIONS", "WITHHELD", "CsvTable",
    "Problem", "Severity", "SiteConfigError", "SiteData", "SiteDataError", "ValidationReport",
    "bsa_inconsistent_with_mosteller", "check_header", "dose_inconsistent_with_bsa", "duplicate_episode_ids",
    "load_site", "mosteller_bsa_m2", "parse_column", "parse_table", "patient_age_inconsistent",
    "patient_height_inconsistent", "patient_sex_inconsistent", "privacy_shares", "read_csv_table",
    "read_site_config", "task_columns", "validate_site", "vitals_without_episodes",
]
