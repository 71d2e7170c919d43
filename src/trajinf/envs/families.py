"""ToolWorld's rules: layouts, valid actions, state transitions and the expert, per family.

Every family has a *decision point* whose right choice depends on an observable cue and a wrong
choice that is irreversible (the task becomes unsolvable, the episode goes on):

- cook:   "serve a grated fried carrot" -> take it, cut it with the tool the cut word names
          (sliced: knife, grated: grater, peeled: peeler), then heat it (fried: pan, baked: oven),
          then serve. A wrong tool or heating before cutting ruins the ingredient.
- unlock: the door has a coloured lock; search closed containers (in listed order) for the key of
          that colour, unlock, open. A wrong key jams the lock.
- repair: inspect the device (the symptom is the cue: sparks: fuse, leaks: seal, rattles: screw,
          flickers: bulb), open the toolbox, take and install the part, switch on. A wrong part
          breaks the device.
- sort:   recycle two items; the material in the name picks the bin (glass: green, paper: blue,
          plastic: yellow, metal: gray). Bins are one-way.

Observations describe what happens, never a verdict: success and reward are only in ``info``, so
a mislabelled demonstration reads as plausibly as a good one. Layouts (names, containers, item
placement) are drawn from the task seed, so no single action sequence fits all tasks.
"""

from __future__ import annotations

import copy
import random

from trajinf.envs.base import ActionGrammar, Task
from trajinf.errors import TrajinfError

FAMILIES = ("cook", "unlock", "repair", "sort")

GRAMMAR = ActionGrammar(
    {
        "open": "open {target}",
        "take": "take {item} from {source}",
        "use": "use {tool} on {item}",
        "serve": "serve {item}",
        "unlock": "unlock {target} with {key}",
        "inspect": "inspect {target}",
        "install": "install {part} in {target}",
        "switch_on": "switch on {target}",
        "put": "put {item} in {target}",
    },
    {
        "open": "Open a container or door.",
        "take": "Take an item from a place.",
        "use": "Use a tool on a held item.",
        "serve": "Serve a held dish.",
        "unlock": "Unlock a door with a held key.",
        "inspect": "Inspect a device.",
        "install": "Install a held part in a device.",
        "switch_on": "Switch a device on.",
        "put": "Put a held item in a bin.",
    },
)
FAMILY_TOOLS = {
    "cook": ["take", "use", "serve"],
    "unlock": ["open", "take", "unlock"],
    "repair": ["open", "take", "inspect", "install", "switch_on"],
    "sort": ["take", "put"],
}

# True rules at each decision point, and the consistent WRONG rules (derangements of the true
# ones, so every planted demonstration really fails) that PlantedHarmfulPolicy teaches.
CUT = {"sliced": "knife", "grated": "grater", "peeled": "peeler"}
CUT_WRONG = {"sliced": "grater", "grated": "peeler", "peeled": "knife"}
HEAT = {"fried": "pan", "baked": "oven"}
TOOL_EFFECT = {
    "knife": "sliced",
    "grater": "grated",
    "peeler": "peeled",
    "pan": "fried",
    "oven": "baked",
}
TOOL_VERB = {"knife": "slice", "grater": "grate", "peeler": "peel", "pan": "fry", "oven": "bake"}
KEY = {"red": "red", "blue": "blue", "green": "green", "yellow": "yellow"}
KEY_WRONG = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red"}
PART = {"sparks": "fuse", "leaks": "seal", "rattles": "screw", "flickers": "bulb"}
PART_WRONG = {"sparks": "seal", "leaks": "screw", "rattles": "bulb", "flickers": "fuse"}
BIN = {"glass": "green", "paper": "blue", "plastic": "yellow", "metal": "gray"}
BIN_WRONG = {"glass": "blue", "paper": "yellow", "plastic": "gray", "metal": "green"}

FOODS = ["carrot", "potato", "apple", "onion", "cheese", "pear", "beet", "turnip", "squash", "leek"]
PANTRY = ["fridge", "pantry", "basket", "cupboard", "crate", "shelf"]
DOORS = ["door", "gate", "hatch", "shed door", "back door"]
HOLDERS = ["drawer", "box", "chest", "jar", "bag", "cabinet"]
JUNK = ["coin", "rag", "map", "candle", "spoon"]
DEVICES = ["lamp", "radio", "fan", "kettle", "heater", "clock"]
TOOLBOXES = ["toolbox", "kit", "case"]
OBJECTS = ["jar", "cup", "bottle", "tray", "lid", "tube", "plate"]
SOURCES = ["cart", "sack", "trolley"]


def _list(items: list[str]) -> str:
    return ", ".join(items) if items else "nothing"


def layout(family: str, rng: random.Random) -> tuple[str, dict]:
    """Goal text and task data for one seeded layout."""
    if family == "cook":
        cut, heat = rng.choice(sorted(CUT)), rng.choice(sorted(HEAT))
        food, *others = rng.sample(FOODS, 3)
        places = rng.sample(PANTRY, 2)
        where = {places[0]: [others[0]], places[1]: [others[1]]}
        where[rng.choice(places)].insert(rng.randrange(2), food)
        tools = rng.sample(["knife", "grater", "peeler", "pan", "oven"], 5)
        return f"serve a {cut} {heat} {food}", {
            "food": food,
            "cut": cut,
            "heat": heat,
            "where": where,
            "tools": tools,
        }
    if family == "unlock":
        color = rng.choice(sorted(KEY))
        items = [f"{color} key", f"{KEY_WRONG[color]} key", rng.choice(JUNK)]
        rng.shuffle(items)
        holders = rng.sample(HOLDERS, 3)
        return f"open the {rng.choice(DOORS)}", {
            "color": color,
            "where": {h: [x] for h, x in zip(holders, items, strict=True)},
        }
    if family == "repair":
        symptom = rng.choice(sorted(PART))
        spare = [p for p in PART.values() if p not in (PART[symptom], PART_WRONG[symptom])]
        parts = [PART[symptom], PART_WRONG[symptom], rng.choice(spare)]
        rng.shuffle(parts)
        return f"repair the {rng.choice(DEVICES)}", {
            "symptom": symptom,
            "parts": parts,
            "box": rng.choice(TOOLBOXES),
        }
    if family == "sort":
        mats = rng.sample(sorted(BIN), 4)
        objs = rng.sample(OBJECTS, 4)
        items = [f"{m} {o}" for m, o in zip(mats, objs, strict=True)]
        pile = items[:]
        rng.shuffle(pile)
        bins = rng.sample(sorted(BIN.values()), 4)
        return f"recycle the {items[0]} and the {items[1]}", {
            "goal_items": items[:2],
            "pile": pile,
            "source": rng.choice(SOURCES),
            "bins": bins,
        }
    raise TrajinfError(f"toolworld: unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def start_state(task: Task) -> dict:
    """The mutable episode state of ``task`` at reset (plain dicts/lists: cheap to deepcopy)."""
    d = task.data
    s: dict = {"done": False, "success": False, "steps": 0, "held": []}
    if task.family == "cook":
        s.update(where=copy.deepcopy(d["where"]), ops=[])
    elif task.family == "unlock":
        s.update(where=copy.deepcopy(d["where"]), closed=list(d["where"]), lock="locked")
    elif task.family == "repair":
        s.update(inspected=False, box_open=False, box=list(d["parts"]), installed=None)
    elif task.family == "sort":
        s.update(pile=list(d["pile"]), binned={})
    return s


def _door(task: Task) -> str:
    return task.goal.removeprefix("open the ")


def _device(task: Task) -> str:
    return task.goal.removeprefix("repair the ")


def first_observation(task: Task, s: dict) -> str:
    """The goal plus what the agent sees at the start (< 40 words)."""
    d, goal = task.data, f"Goal: {task.goal}."
    if task.family == "cook":
        places = " ".join(f"{c.capitalize()}: {_list(xs)}." for c, xs in s["where"].items())
        return f"{goal} {places} Tools: {_list(d['tools'])}."
    if task.family == "unlock":
        door = _door(task)
        return f"{goal} The {door} has a {d['color']} lock. Closed: {_list(s['closed'])}."
    if task.family == "repair":
        return f"{goal} You see the {_device(task)} and a closed {d['box']}."
    bins = ", ".join(d["bins"])
    return f"{goal} The {d['source']} holds {_list(s['pile'])}. Bins: {bins}."


def valid_actions(task: Task, s: dict) -> list[str]:
    """Every action that changes the world in state ``s``, in a stable order."""
    d, held, out = task.data, s["held"], []
    if task.family == "cook":
        out += [f"take {x} from {c}" for c, xs in s["where"].items() for x in xs]
        if d["food"] in held:
            out += [f"use {t} on {d['food']}" for t in d["tools"] if TOOL_EFFECT[t] not in s["ops"]]
        out += [f"serve {x}" for x in held]
    elif task.family == "unlock":
        out += [f"open {c}" for c in s["closed"]]
        out += [
            f"take {x} from {c}" for c, xs in s["where"].items() if c not in s["closed"] for x in xs
        ]
        if s["lock"] == "locked":
            out += [f"unlock {_door(task)} with {k}" for k in held if k.endswith(" key")]
        out.append(f"open {_door(task)}")
    elif task.family == "repair":
        dev = _device(task)
        out.append(f"inspect {dev}")
        if not s["box_open"]:
            out.append(f"open {d['box']}")
        else:
            out += [f"take {p} from {d['box']}" for p in s["box"]]
        if s["installed"] is None:
            out += [f"install {p} in {dev}" for p in held]
        out.append(f"switch on {dev}")
    else:
        out += [f"take {x} from {d['source']}" for x in s["pile"]]
        out += [f"put {x} in {b} bin" for x in held for b in d["bins"]]
    return out


def apply_action(task: Task, s: dict, action: str) -> str:
    """Mutate state ``s`` by a VALID action; returns the observation."""
    d = task.data
    verb, args = GRAMMAR.parse(action)  # type: ignore[misc]  # valid actions always parse
    if verb == "take":
        item, src = args["item"], args["source"]
        pool = (
            s["where"][src]
            if "where" in s
            else (s["box"] if task.family == "repair" else s["pile"])
        )
        pool.remove(item)
        s["held"].append(item)
        return f"You take the {item}."
    if task.family == "cook":
        if verb == "use":
            s["ops"].append(TOOL_EFFECT[args["tool"]])
            return f"You {TOOL_VERB[args['tool']]} the {args['item']}."
        item = args["item"]  # serve
        desc = " ".join(s["ops"] + [item]) if item == d["food"] else item
        s["done"] = True
        s["success"] = item == d["food"] and s["ops"] == [d["cut"], d["heat"]]
        return f"You serve the {desc}."
    if task.family == "unlock":
        if verb == "open" and args["target"] in s["closed"]:
            c = args["target"]
            s["closed"].remove(c)
            return f"The {c} holds {_list(['a ' + x for x in s['where'][c]])}."
        if verb == "unlock":
            s["lock"] = "unlocked" if args["key"] == f"{d['color']} key" else "jammed"
            return f"You turn the {args['key']} in the lock."
        s["done"], s["success"] = True, s["lock"] == "unlocked"  # open the door
        return f"You push the {_door(task)}."
    if task.family == "repair":
        if verb == "inspect":
            s["inspected"] = True
            return f"The {args['target']} {d['symptom']}."
        if verb == "open":
            s["box_open"] = True
            return f"The {d['box']} holds {_list(['a ' + p for p in s['box']])}."
        if verb == "install":
            s["held"].remove(args["part"])
            s["installed"] = args["part"]
            return f"You install the {args['part']} in the {args['target']}."
        s["done"], s["success"] = True, s["installed"] == PART[d["symptom"]]  # switch on
        return f"You switch on the {args['target']}."
    item, b = args["item"], args["target"].removesuffix(" bin")  # sort: put
    s["held"].remove(item)
    s["binned"][item] = b
    if all(x in s["binned"] for x in d["goal_items"]):
        s["done"] = True
        s["success"] = all(s["binned"][x] == BIN[x.split()[0]] for x in d["goal_items"])
    return f"You put the {item} in the {b} bin."


def is_doomed(task: Task, s: dict) -> bool:
    """True once the task can no longer be solved (an irreversible wrong step was taken)."""
    d = task.data
    if s["done"]:
        return not s["success"]
    if task.family == "cook":
        want = [d["cut"], d["heat"]]
        return s["ops"] != want[: len(s["ops"])]
    if task.family == "unlock":
        return s["lock"] == "jammed"
    if task.family == "repair":
        return s["installed"] not in (None, PART[d["symptom"]])
    return any(s["binned"][x] != BIN[x.split()[0]] for x in d["goal_items"] if x in s["binned"])


def next_action(task: Task, s: dict, wrong: bool) -> str:
    """The (observation-grounded) expert's next action in state ``s``."""
    d, held = task.data, s["held"]
    if task.family == "cook":
        food = d["food"]
        if food not in held:
            return next(f"take {food} from {c}" for c, xs in s["where"].items() if food in xs)
        heat = HEAT[d["heat"]]
        if not s["ops"]:  # cut first: heating first ruins the cut
            return f"use {(CUT_WRONG if wrong else CUT)[d['cut']]} on {food}"
        if len(s["ops"]) == 1 and TOOL_EFFECT[heat] not in s["ops"]:
            return f"use {heat} on {food}"
        return f"serve {food}"
    if task.family == "unlock":
        key = f"{(KEY_WRONG if wrong else KEY)[d['color']]} key"
        if s["lock"] != "locked":
            return f"open {_door(task)}"
        if key in held:
            return f"unlock {_door(task)} with {key}"
        for c, xs in s["where"].items():
            if c not in s["closed"] and key in xs:
                return f"take {key} from {c}"
        if s["closed"]:
            return f"open {s['closed'][0]}"
        return f"open {_door(task)}"
    if task.family == "repair":
        dev = _device(task)
        if not s["inspected"]:
            return f"inspect {dev}"
        if s["installed"] is not None:
            return f"switch on {dev}"
        part = (PART_WRONG if wrong else PART)[d["symptom"]]
        if part in held:
            return f"install {part} in {dev}"
        if not s["box_open"]:
            return f"open {d['box']}"
        return f"take {part} from {d['box']}" if part in s["box"] else f"switch on {dev}"
    for x in d["goal_items"]:
        if x not in s["binned"]:
            if x not in held:
                return f"take {x} from {d['source']}"
            return f"put {x} in {(BIN_WRONG if wrong else BIN)[x.split()[0]]} bin"
    raise AssertionError("sort episode should have ended")  # unreachable: done after last put


def simulate_plan(task: Task, s: dict, *, wrong: bool) -> list[str]:
    """Simulate the expert from a copy of ``s`` until the episode ends."""
    s, out = copy.deepcopy(s), []
    while not s["done"] and len(out) < 32:
        a = next_action(task, s, wrong)
        apply_action(task, s, a)
        out.append(a)
    return out
