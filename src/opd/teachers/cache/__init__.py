"""The offline teacher cache: its format (`format`), how it is written (`generate`) and
reviewed (`inspect`). Training reads it through `opd.teachers.cached`."""
