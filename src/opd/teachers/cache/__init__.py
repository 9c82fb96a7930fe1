"""The offline teacher cache: how it is written (`generate`, from a model; `endpoint`, from
an OpenAI-compatible server), what made it (`spec`) and how it is reviewed (`inspect`). Its
format lives in `opd.data.cache_format`; training reads it through `opd.teachers.cached`."""
