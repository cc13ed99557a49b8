"""SLSA v1 provenance of a release: the in-toto Statement of who built it and from what, and its checks.

The statement (https://slsa.dev/provenance/v1) has the release files as
subjects (name and sha256) and records:

- ``buildDefinition.externalParameters``: every run parameter and the data source;
- ``buildDefinition.internalParameters``: the run's settings (seed, strict mode,
  threads, image size) and the training process's environment record (package
  versions, determinism settings, CPU and devices);
- ``buildDefinition.resolvedDependencies``: the code (git commit, with the
  dirty flag, and the code package's sha when pods ran it) and the data set
  (its fingerprint, the hash of what was read);
- ``runDetails``: the builder (the flow) and the run's pathspec, start and finish times.

`petseg.release.signing` signs it; `check` refuses a statement that is not about the
release it came with.
"""

from __future__ import annotations

import hashlib

from petseg.errors import ModelError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/petseg/petseg/PetSegFlow@v1"
SUBJECTS = ("model.keras", "calibration.json", "manifest.json")
"""The release files the statement is about."""


def statement(files: dict[str, bytes], *, manifest: dict, parameters: dict, environment: dict | None,
              started: str, finished: str) -> dict:
    """The SLSA v1 provenance statement of a release.

    Args:
        files: the release files' bytes by name (at least `SUBJECTS`).
        manifest: the release manifest (pathspec, fingerprints, settings with the code record).
        parameters: every run parameter by name.
        environment: the train step's environment record (`petseg.model.determinism.environment_record`).
        started: the run's start time (RFC 3339).
        finished: when the release was made (RFC 3339).
    """
    settings = dict(manifest.get("settings") or {})
    code = settings.pop("code", None) or {}
    dependencies = []
    if code.get("commit"):
        dependencies.append({"uri": f"git+{code.get('repository') or code.get('checkout') or 'local'}",
                             "digest": {"gitCommit": code["commit"]},
                             "annotations": {"dirty": bool(code.get("dirty")), "branch": code.get("branch")}})
    if code.get("code_package"):
        dependencies.append({"uri": "metaflow:code-package", "digest": {"sha1": code["code_package"]}})
    dependencies.append({"uri": str(parameters.get("source") or ""), "name": "dataset",
                         "digest": {"sha256": manifest["dataset_fingerprint"]},
                         "annotations": {"feedback": parameters.get("feedback") or None}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": hashlib.sha256(files[name]).hexdigest()}}
                    for name in SUBJECTS],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"parameters": parameters, "source": parameters.get("source")},
                "internalParameters": {"settings": settings, "code": code, "environment": environment or {}},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": f"{BUILD_TYPE}#{manifest['pathspec'].split('/')[0]}"},
                "metadata": {"invocationId": manifest["pathspec"], "startedOn": started, "finishedOn": finished},
            },
        },
    }


def check(document: dict, files: dict[str, bytes], *, where: str) -> str:
    """Check that a verified statement is SLSA v1 provenance of exactly these release files.

    Returns:
        The run pathspec it records.

    Raises:
        ModelError: another type, or a subject missing or with another sha256 (naming it).
    """
    if document.get("_type") != STATEMENT_TYPE or document.get("predicateType") != PREDICATE_TYPE:
        raise ModelError(f"release {where}: its provenance is a {document.get('predicateType')!r} statement, "
                         f"expected {PREDICATE_TYPE}")
    subjects = {subject.get("name"): (subject.get("digest") or {}).get("sha256")
                for subject in document.get("subject") or []}
    for name in SUBJECTS:
        found = hashlib.sha256(files[name]).hexdigest()
        if subjects.get(name) != found:
            raise ModelError(f"release {where}: its provenance statement is for another release: it records "
                             f"{name} as {subjects.get(name) or '(nothing)'}, the release's {name} is {found}")
    metadata = (document.get("predicate") or {}).get("runDetails", {}).get("metadata", {})
    return str(metadata.get("invocationId") or "")
