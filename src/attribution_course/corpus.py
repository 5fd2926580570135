"""The vocabulary and sentence templates of the course's IOI task.

Everything the shipped model was trained on, and everything the prompt builder
draws from, is defined here, so that the train/test split is visible in one place.

Every template has the same shape, 14 words after the beginning-of-sequence token::

    position:  0    1     2   3   4    5    6   7    8    9  10   11   12  13  14
               BOS  When  A   and B    went to  the  PLACE ,  S    gave a   OBJ to

so the first two names sit at positions 2 and 4, the repeated subject at
position 10 and the prediction is made at position 14. Fixed positions let a
batch of prompts share one set of position labels (no padding tricks).
"""

from __future__ import annotations

#: Names used in training prompts.
TRAIN_NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Anna", "Paul",
    "Kate", "Jack", "Lisa", "Mark", "Sarah", "David", "Laura", "Peter", "Emma", "Mike",
    "Alice", "Bob", "Jane", "Steve", "Ruth", "Carl", "Rose", "Frank", "Helen", "Sam",
    "Grace", "Henry", "Julia", "Kevin", "Linda", "Adam", "Nina", "Oscar", "Paula", "Ryan",
    "Susan", "Tony", "Vera", "Will", "Eric", "Diana", "Brian", "Claire", "Alex", "Andrew",
    "Arthur", "Barbara", "Betty", "Bill", "Carol", "Charles", "Chris", "Daniel", "Edward", "Ellen",
    "Emily", "Fred", "Gary", "Harry", "Ian", "Jacob", "Jason", "Jeff", "Jennifer", "Jessica",
    "Jim", "Joan", "Jordan", "Joseph", "Josh", "Justin", "Keith", "Kelly", "Larry", "Leo",
    "Lewis", "Lily", "Luke", "Maria", "Matt", "Max", "Megan", "Michael", "Nancy", "Nathan",
    "Neil", "Nick", "Oliver", "Patrick", "Philip", "Rachel", "Richard", "Robert", "Roger", "Sally",
    "Scott", "Sean", "Sophie", "Stephen", "Thomas", "Tim", "Victoria", "Walter", "Wendy", "Zoe",
)
#: Names never seen in an IOI training sentence (they occur only in filler sentences).
TEST_NAMES: tuple[str, ...] = (
    "Joe", "Ben", "Lucy", "George", "Ann", "Roy", "Jill", "Victor", "Karen", "Louis",
    "Clara", "Simon", "Hannah", "Ray", "Ed", "Amanda", "Colin", "Eva", "Greg", "Irene",
)

PLACES: tuple[str, ...] = (
    "store", "park", "school", "office", "beach", "house", "garden", "library",
    "station", "market", "hospital", "restaurant", "river", "church", "museum", "hotel",
)
OBJECTS: tuple[str, ...] = (
    "drink", "ring", "book", "bone", "kiss", "basketball", "computer", "necklace",
    "bag", "snack", "letter", "key", "hat", "ticket", "cake", "flower",
)

#: Templates with ``{A}``/``{B}`` (first two names), ``{S}`` (repeated subject),
#: ``{PLACE}`` and ``{OBJECT}``. Each is 14 words; the answer follows the last word.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE} , {S} gave a {OBJECT} to",
    "While {A} and {B} were at the {PLACE} , {S} handed a {OBJECT} to",
    "After {A} and {B} arrived at the {PLACE} , {S} passed a {OBJECT} to",
    "Once {A} and {B} got to the {PLACE} , {S} brought a {OBJECT} to",
    "Then {A} and {B} walked into the {PLACE} , {S} threw a {OBJECT} to",
    "Later {A} and {B} stopped by the {PLACE} , {S} showed a {OBJECT} to",
    "Friends {A} and {B} met at the {PLACE} , {S} offered a {OBJECT} to",
    "Since {A} and {B} stayed at the {PLACE} , {S} sent a {OBJECT} to",
    "Today {A} and {B} ran to the {PLACE} , {S} lent a {OBJECT} to",
    "Yesterday {A} and {B} worked at the {PLACE} , {S} sold a {OBJECT} to",
)
TEST_TEMPLATES: tuple[str, ...] = (
    "So {A} and {B} drove to the {PLACE} , {S} mailed a {OBJECT} to",
    "Before {A} and {B} left for the {PLACE} , {S} tossed a {OBJECT} to",
    "As {A} and {B} sat in the {PLACE} , {S} returned a {OBJECT} to",
)

#: Filler sentences: they put every name (train and test) in the corpus in a
#: non-IOI role, so held-out names have trained embeddings without the model
#: ever seeing them in an IOI sentence.
FILLER_TEMPLATES: tuple[str, ...] = (
    "the {OBJECT} at the {PLACE} belongs to {A} .",
    "{A} likes the {PLACE} and the {OBJECT} .",
    "a {OBJECT} was given to {A} .",
)

BOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"

#: Position labels shared by every IOI prompt (index = token position).
POSITION_LABELS: tuple[str, ...] = (
    "BOS", "start", "name1", "and", "name2", "verb1", "prep", "the", "place", ",",
    "S2", "verb2", "a", "object", "end",
)
N_POSITIONS = len(POSITION_LABELS)
NAME1_POSITION = POSITION_LABELS.index("name1")
NAME2_POSITION = POSITION_LABELS.index("name2")
S2_POSITION = POSITION_LABELS.index("S2")
END_POSITION = N_POSITIONS - 1


def all_words() -> list[str]:
    """Every word in the corpus, sorted, for a word-level tokenizer."""
    words: set[str] = set(TRAIN_NAMES) | set(TEST_NAMES) | set(PLACES) | set(OBJECTS)
    slots = {"{A}", "{B}", "{S}", "{PLACE}", "{OBJECT}"}
    for template in TRAIN_TEMPLATES + TEST_TEMPLATES + FILLER_TEMPLATES:
        words |= {w for w in template.split() if w not in slots}
    words.add(".")
    return sorted(words)
