"""Teachers: one `score` interface over local, self, remote and cached implementations."""

from opd.teachers.base import Teacher, TeacherScores, check_need, scores_from_logits
from opd.teachers.cached import CachedTeacher
from opd.teachers.local import LocalTeacher
from opd.teachers.self_teacher import SelfTeacher

__all__ = ["LocalTeacher", "Teacher", "TeacherScores", "check_need", "scores_from_logits"]
__all__ += ["CachedTeacher"]
__all__ += ["SelfTeacher"]
