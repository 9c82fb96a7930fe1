"""A teacher whose tokenizer is not the student's: byte alignment (`align`), the teacher's
view of a student batch (`render`), its distribution in the student's vocabulary
(`vocab_map`) and the wrapper that scores on the student's grid (`teacher`)."""
