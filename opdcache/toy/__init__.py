"""The embedded long-horizon toy task and the teacher/student pairs the project builds itself."""
