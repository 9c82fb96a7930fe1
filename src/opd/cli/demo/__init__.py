"""The built-in offline task and tiny teacher/student models behind `opd demo`."""
