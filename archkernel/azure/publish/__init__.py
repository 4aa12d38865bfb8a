"""azure_publish: take the verified VHD into Azure, as a managed disk and a Compute Gallery
image version (target "gallery") or as a page blob (target "blob").

- `extents`: which byte ranges an upload sends (pure).
- `upload`: the upload engine (sparse, parallel, resumable, renews an expired SAS).
- `secrets`: keeps SAS tokens and keys out of messages.
- `check`: step 1, what must hold before any request.
- `arm`: the Resource Manager calls (disks, galleries) through azure-mgmt-compute.
- `steps`: the workflow's step functions.

Azure's SDKs are an optional extra (`pip install 'archkernel[azure]'`): nothing here
imports them until a step runs (`sdk`).
"""
