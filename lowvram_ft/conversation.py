"""The one shape every data format is normalised into, and every renderer reads.

Plain frozen values, no heavy imports: the data package builds them from rows, harmony.py renders them for
gpt-oss, the tokenizer's own chat template renders them for other models, evaluate.py builds prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass(frozen=True)
class Message:
    """One turn. For the assistant, `content` is the final answer and `thinking` the reasoning
    (Harmony's analysis channel); `thinking` is None for every other role."""

    role: str
    content: str
    thinking: str | None = None


@dataclass(frozen=True)
class Conversation:
    """A training example or an evaluation prompt.

    `messages` holds the instruction text (system/developer roles: both become Harmony's developer
    message for gpt-oss), user turns and assistant turns. `reasoning_language` becomes the
    `reasoning language: X` line of the developer message; `reasoning_effort` overrides the
    configured default for this row. `gold` is the expected answer when the row has a `gold` column
    (GRPO's accuracy reward); it is never rendered.
    """

    messages: tuple[Message, ...]
    reasoning_language: str | None = None
    reasoning_effort: str | None = None
    gold: str | None = None

    def instructions(self) -> str:
        """The system/developer text, joined; '' when there is none."""
        return "\n\n".join(m.content for m in self.messages if m.role in ("system", "developer") and m.content)

    def developer_text(self) -> str:
        """The instruction text every renderer writes: `reasoning language: X` (when set), one blank line,
        then the system/developer text, verbatim. Instruction text that is only blank lines (what is left
        of a row's system message after its language line is lifted) follows the language line as it
        stands, so `"reasoning language: X\\n\\n"` renders as written. '' when there is neither."""
        language = f"reasoning language: {self.reasoning_language}" if self.reasoning_language else ""
        instructions = self.instructions()
        return language + ("\n\n" if language and instructions.strip() else "") + instructions

    def turns(self) -> tuple[Message, ...]:
        """The user/assistant/tool turns, in order."""
        return tuple(m for m in self.messages if m.role not in ("system", "developer"))
