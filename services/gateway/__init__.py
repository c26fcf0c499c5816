"""The DICOM gateway: the node that PACS and modalities send studies to (C-STORE)."""
