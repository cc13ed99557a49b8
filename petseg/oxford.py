"""The Oxford-IIIT Pet vocabulary: breeds, species, file layout, list.txt lines, trimap values, split names.

Everything that reads or writes data in the Oxford layout (the synthetic
generator, ingest, the feedback store, the split rule) takes its names from
here, so the format has one definition.
"""

from __future__ import annotations

from petseg.errors import DataError

BREEDS = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll",
    "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)
"""The 37 breeds in CLASS-ID order (alphabetical, ignoring case); cat breeds are capitalised."""

SPECIES = ("cat", "dog")
"""SPECIES ids 1 and 2 of list.txt."""

CLASSES = ("pet", "background", "border")
"""Model classes: class k is trimap value k + 1."""

TRIMAP_VALUES = (1, 2, 3)
"""Trimap labels: 1 pet, 2 background, 3 a border band between them."""

SPLITS = ("training", "validation", "test", "calibration")
"""The project's splits (see `petseg.data.split`)."""

OFFICIAL_LISTS = ("trainval", "test")
"""The release's own split files, ``annotations/<name>.txt``, in list.txt format."""

FEEDBACK_ACCEPTED = "accepted"
"""The folder of a feedback store (`petseg.serving.quarantine`) that holds reviewed, accepted samples in this layout."""

LIST_FILE = "annotations/list.txt"

# The six comment lines that open the real annotations/list.txt, verbatim
# (including its typos and its swapped breed-id ranges).
LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID\n"
    "#ID: 1:37 Class ids\n"
    "#SPECIES: 1:Cat 2:Dog\n"
    "#BREED ID: 1-25:Cat 1:12:Dog\n"
    "#All images with 1st letter as captial are cat images\n"
    "#images with small first letter are dog images\n"
)


def image_file(sample_id: str) -> str:
    """The image of a sample, relative to the data set's root."""
    return f"images/{sample_id}.jpg"


def trimap_file(sample_id: str) -> str:
    """The trimap of a sample, relative to the data set's root."""
    return f"annotations/trimaps/{sample_id}.png"


def species_of(breed: str) -> str:
    """``"cat"`` or ``"dog"``: Oxford capitalises cat breeds only."""
    return "cat" if breed[0].isupper() else "dog"


def breed_ids(breed: str) -> tuple[int, int, int]:
    """The Oxford ``(CLASS-ID, SPECIES, BREED-ID)`` of a breed.

    Args:
        breed: one of :data:`BREEDS`.

    Returns:
        CLASS-ID 1-37 over all breeds, SPECIES 1 for cats and 2 for dogs,
        BREED-ID counted within the species (1-12 cats, 1-25 dogs).
    """
    species = species_of(breed)
    same_species = [name for name in BREEDS if species_of(name) == species]
    return BREEDS.index(breed) + 1, SPECIES.index(species) + 1, same_species.index(breed) + 1


def list_line(sample_id: str, breed: str) -> str:
    """The ``annotations/list.txt`` line of one sample: ``<id> CLASS-ID SPECIES BREED-ID``."""
    class_id, species, breed_id = breed_ids(breed)
    return f"{sample_id} {class_id} {species} {breed_id}\n"


def listed_ids(text: str) -> list[str]:
    """The sample ids of a list.txt-format text, in file order (comments and blank lines skipped)."""
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]


def parse_species(text: str, *, where: str = LIST_FILE) -> dict[str, str]:
    """Read a list.txt-format text into ``{sample_id: "cat" | "dog"}``.

    Raises:
        DataError: a line is not ``Image CLASS-ID SPECIES BREED-ID`` with SPECIES 1 or 2;
            the message names ``where`` and the line.
    """
    species = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4 or fields[2] not in ("1", "2"):
            raise DataError(f"{where} line {number}: {line!r}; expected 'Image CLASS-ID SPECIES BREED-ID' "
                            "with SPECIES 1 (cat) or 2 (dog)")
        species[fields[0]] = SPECIES[int(fields[2]) - 1]
    return species
