//! The built-in libraries of the system personas, written in their voices: what Brad, Sarah and
//! Alex draw on in every call. Brought to this shipped definition at startup like the personas
//! themselves (a changed document is removed and added anew; its id carries its hash).

/// A shipped document: (title, Markdown).
pub struct ShippedDocument {
    pub slug: &'static str,
    pub title: &'static str,
    pub markdown: &'static str,
}

/// The documents of system persona `persona_id` (none for an unknown id).
pub fn library(persona_id: &str) -> &'static [ShippedDocument] {
    match persona_id {
        "brad_001" => BRAD,
        "sarah_001" => SARAH,
        "alex_001" => ALEX,
        _ => &[],
    }
}

const BRAD: &[ShippedDocument] = &[
    ShippedDocument {
        slug: "brad-playbook",
        title: "Brad's accountability playbook",
        markdown: "# The two-minute rule\n\
If a task takes less than two minutes, you do it now. Not after coffee, not after one more \
video. Now. Everything bigger gets a time on the calendar or it isn't real.\n\n\
# Commitments\n\
When you tell me you'll do something, I want three things: what exactly, by when, and how I'll \
know it's done. 'I'll work out more' is a wish. 'Thirty minutes on the bike, Monday, Wednesday, \
Friday, before 8 am' is a commitment.\n\n\
# Excuses\n\
Tired, busy, not feeling it: I've heard them all, I've used them all. The fix is the same: \
shrink the step until it's too small to skip. Can't do thirty minutes? Do ten. Can't do ten? \
Put your shoes on and walk to the door.\n\n\
# Bad days\n\
Missing once is an accident. Missing twice is the start of a new habit. So after a miss, the \
only job is to show up the next day, even at half effort.\n",
    },
    ShippedDocument {
        slug: "brad-training",
        title: "Brad on training and energy",
        markdown: "# Training basics\n\
Three strength sessions a week beat one heroic one. Walk every day; ten thousand steps is a \
fine target, eight thousand is fine too. Progress means a little more than last week, not a \
lot more than yesterday.\n\n\
# Sleep\n\
Seven to nine hours. Same bedtime on weekends. Phone out of the bedroom. Nobody out-trains \
bad sleep.\n\n\
# Food\n\
Protein at every meal, vegetables at two, water before coffee. Plan tomorrow's lunch tonight. \
For anything medical, see a doctor, not me.\n",
    },
];

const SARAH: &[ShippedDocument] = &[
    ShippedDocument {
        slug: "sarah-listening",
        title: "Sarah's ways of listening",
        markdown: "# When you're overwhelmed\n\
Let's make it smaller together. Name the one thing that weighs the most right now. We don't \
have to fix it tonight; we just have to see it clearly. Sometimes writing three lines about it \
before bed helps the mind let go.\n\n\
# When you feel lonely\n\
Loneliness isn't a flaw; it's a signal, like hunger. A tiny step counts: a message to one old \
friend, a walk somewhere with people, a class you've been curious about.\n\n\
# Grounding\n\
When things spin, try five-four-three-two-one: five things you see, four you can touch, three \
you hear, two you smell, one you taste. Breathe in for four, out for six.\n\n\
# Getting more help\n\
I'm a friend, not a therapist. If the heaviness stays for weeks, or you think about hurting \
yourself, please talk to a doctor or call your local crisis line. Reaching out is brave.\n",
    },
    ShippedDocument {
        slug: "sarah-relationships",
        title: "Sarah on hard conversations",
        markdown: "# Before a hard talk\n\
Decide what you want the other person to understand, in one sentence. Pick a calm moment, not \
the middle of an argument.\n\n\
# During it\n\
Say 'I feel' rather than 'you always'. Ask what they heard you say. It's okay to pause and come \
back to it tomorrow.\n\n\
# After it\n\
Be kind to yourself whatever happened. One honest conversation is a win, even if it was messy.\n",
    },
];

const ALEX: &[ShippedDocument] = &[
    ShippedDocument {
        slug: "alex-brainstorming",
        title: "Alex's brainstorming toolbox",
        markdown: "# Crazy eights\n\
Fold a page into eight boxes, set a timer for eight minutes, and sketch one idea per box. \
Quantity first; judging comes later.\n\n\
# Yes, and\n\
Take the last idea and add something instead of fixing it. The weird additions are where the \
good stuff hides.\n\n\
# Constraints\n\
Stuck? Add a limit: a budget of ten dollars, one afternoon, only things in your kitchen. \
Constraints make ideas sharper.\n\n\
# Picking one\n\
Score each idea on excitement and on effort, from one to five. Start with high excitement and \
low effort, and build a tiny prototype this week.\n",
    },
    ShippedDocument {
        slug: "alex-creative-block",
        title: "Alex on creative block",
        markdown: "# Creative block\n\
Blocks usually mean you're judging too early. Make something deliberately bad for ten minutes; \
it loosens everything up.\n\n\
# Steal like an artist\n\
Collect five things you love from other people's work and ask what they have in common. That \
common thread is your style trying to get out.\n\n\
# Daily practice\n\
Twenty minutes a day beats a weekend binge. Keep an idea notebook by the bed; the best ideas \
show up at inconvenient times.\n",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knowledge::split::split;

    #[test]
    fn every_system_persona_has_a_library_that_splits_into_passages() {
        for p in crate::persona::system::system_personas() {
            let docs = library(p.id);
            assert!(!docs.is_empty(), "{}", p.id);
            for d in docs {
                assert!(split(d.markdown).len() >= 3, "{}", d.slug);
                assert!(d.title.chars().count() <= crate::knowledge::MAX_TITLE_CHARS);
            }
        }
    }
}
