"""Import tools: FITS / HDF5 / Zarr / image cutouts -> cutout store, PNG previews, LS tasks."""
