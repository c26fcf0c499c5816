"""De-identification of DICOM headers before anything is stored.

The rules are the DICOM PS3.15 Basic Application Level Confidentiality Profile as tabulated by
the `dicom-anonymizer` package (Table E.1-1, 2026c edition: remove, empty, replace or remap
each listed attribute), plus private tags removed. Where that package falls short we say so
and close the gap here:

- its UID remapping draws random UIDs and remembers them in a process-global dict, so two
  workers (or one after a restart) would give the same study two different UIDs, and the dict
  grows forever. We remap every UID the profile lists to a keyed hash of the original
  (HMAC-SHA256 with the server's secret, as a 2.25 UUID-derived UID): the same original gives
  the same pseudonymous UID in every process, and it cannot be reversed without the secret.
- it applies its table to the top-level dataset only. We apply it to every nested item as
  well, so a Patient ID or a referenced SOP Instance UID inside a sequence is treated too.
- its "remove" action keeps dates (it writes 00010101 into DA elements instead of removing
  them). We remove what the profile says to remove (X).
- the Patient ID it would blank becomes the patient key (the same keyed hash the database
  uses), so de-identified files of one patient still group together.

Not covered by the basic profile, and so not here: identity burnt into the pixels
(BurnedInAnnotation YES); mammograms carry laterality markers there, not names, as a rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import VR

from shared.pseudonyms import pseudonymous_uid

PROFILE_EDITION = "dicomfields_2026c"
# PS3.16 CID 7050 codes for what was done; 113100 is the basic profile itself.
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
# DeidentificationMethod is LO: at most 64 characters.
METHOD_DESCRIPTION = "PS3.15 basic profile; keyed UIDs; private tags removed"

# File meta elements that name the sender or carry private data; the profile's table keeps
# to the dataset proper.
META_IDENTIFYING_KEYWORDS = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformation",
    "PrivateInformationCreatorUID",
)

Action = Callable[[Dataset, Any], None]


def profile_tables() -> dict[str, list[tuple[int, ...]]]:
    """The profile's tags by action: U_TAGS (remap UID), X_TAGS (remove), Z_TAGS ..."""
    tables: dict[str, list[tuple[int, ...]]] = dicom_anonymization_database_selector(
        PROFILE_EDITION
    )
    return tables


def _remove(dataset: Dataset, tag: tuple[int, ...]) -> None:
    if len(tag) == 2 and tag in dataset:
        del dataset[tag]


class Deidentifier:
    """Applies the profile to header datasets; one instance per server secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._actions: dict[tuple[int, ...], Action] = initialize_actions(PROFILE_EDITION)
        tables = profile_tables()
        for tag in tables["X_TAGS"]:
            if len(tag) == 2:  # repeating-group masks keep the library's own walk
                self._actions[tag] = _remove
        for tag in tables["U_TAGS"]:
            self._actions[tag] = self._remap_uid_element
        # Repeating-group rules (group, element, group mask, element mask): the library walks
        # the whole dataset once for each, so it is handed only those that match a tag present.
        self._masks = [(rule, act) for rule, act in self._actions.items() if len(rule) > 2]

    def pseudonymous_uid(self, uid: str) -> str:
        return pseudonymous_uid(self._secret, uid)

    def _remap_uid_element(self, dataset: Dataset, tag: tuple[int, int]) -> None:
        element = dataset.get(tag)
        if element is None or not element.value:
            return
        if isinstance(element.value, MultiValue):
            element.value = [self.pseudonymous_uid(str(v)) for v in element.value]
        else:
            element.value = self.pseudonymous_uid(str(element.value))

    def apply(self, dataset: Dataset, *, patient_key: str) -> None:
        """De-identify `dataset` (a header, without pixel data) in place."""
        self._apply_nested(dataset)
        # Group lengths (gggg,0000) are retired and now wrong; pydicom does not rewrite them.
        for tag in list(dataset.keys()):
            if tag.element == 0:
                del dataset[tag]
        dataset.PatientID = patient_key[:64]
        dataset.PatientName = ""
        dataset.PatientIdentityRemoved = "YES"
        dataset.DeidentificationMethod = METHOD_DESCRIPTION
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
        dataset.DeidentificationMethodCodeSequence = Sequence([code])
        meta = getattr(dataset, "file_meta", None)
        if meta is not None:
            meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            for keyword in META_IDENTIFYING_KEYWORDS:
                if keyword in meta:
                    del meta[keyword]

    def _apply_nested(self, dataset: Dataset) -> None:
        # The library looks up each of its ~600 rules in the dataset; a header has a few dozen
        # elements, so hand it only the rules for tags present: the same result in a fraction
        # of the time. Nested items get their own call below.
        present = [(int(tag.group), int(tag.element)) for tag in dataset.keys()]  # noqa: SIM118 - tags, not elements
        rules: dict[tuple[int, ...], Action] = {
            tag: self._actions[tag] for tag in present if tag in self._actions
        }
        for (group, element, group_mask, element_mask), act in self._masks:
            if any(
                g & group_mask == group & group_mask and e & element_mask == element & element_mask
                for g, e in present
            ):
                rules[(group, element, group_mask, element_mask)] = act
        anonymize_dataset(
            dataset,
            extra_anonymization_rules=rules,
            delete_private_tags=False,
            base_rules_gen=dict,
        )
        # By tag, not by element: reading an element parses its value, and an element no rule
        # touched stays as it was read, which the writer copies as it is (a header written
        # this way costs a quarter less; the bytes are the same).
        for tag in list(dataset.keys()):
            if tag.is_private:
                del dataset[tag]
            elif _value_representation(dataset, tag) == VR.SQ:
                for item in dataset[tag].value or []:
                    self._apply_nested(item)


def _value_representation(dataset: Dataset, tag: BaseTag) -> str:
    """The element's VR without parsing its value where the file states it (explicit VR);
    else (implicit VR, or UN: a sender's way to pass a sequence it does not know) the
    dictionary's, which pydicom also gives UN when it parses the element; else its reading."""
    stated: str | None = dataset.get_item(tag).VR
    if stated is not None and stated != VR.UN:
        return stated
    try:
        return dictionary_VR(tag)
    except KeyError:
        return dataset[tag].VR
