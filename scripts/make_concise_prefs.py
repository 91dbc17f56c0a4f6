#!/usr/bin/env python3
# Copyright the ropo authors. Licensed under the Apache License, Version 2.0.
"""Generate the concise_prefs preference data set (data/concise_prefs/{train,eval}.jsonl).

Every pair has a short factual prompt, a *chosen* answer of one or two short correct
sentences, and a *rejected* answer in one of three styles:

  padded   the correct answer wrapped in filler, with the same sentence or phrase repeated
  wrong    a wrong answer written in the same short style as the chosen one
  rambling restates the question, repeats itself, and buries, flip-flops on or never gives the answer

The facts are hand-written below; arithmetic and letter/word-counting answers are computed
here so that they are right by construction. The rejected variants are composed from the
facts with a seeded random generator, so the output is byte-for-byte reproducible with any
Python 3 (standard library only).

    python3 scripts/make_concise_prefs.py            # (re)write data/concise_prefs/*.jsonl
    python3 scripts/make_concise_prefs.py --check    # exit 1 unless the shipped files match
    python3 scripts/make_concise_prefs.py --stats    # also print counts and length statistics
"""

import argparse
import json
import os
import random
import sys

SEED = 20261130
N_EVAL = 60
# Rejected-style proportions, applied exactly (largest remainder) within each split.
STYLE_WEIGHTS = [("padded", 0.40), ("wrong", 0.30), ("rambling", 0.30)]
MAX_WORDS = 80

# ---------------------------------------------------------------------------------------------
# Facts. Each hand-written item is (question, chosen, wrong): chosen is correct and short,
# wrong is an incorrect answer in the same style.
# ---------------------------------------------------------------------------------------------

# (country as used mid-sentence, capital, a plausible wrong city of the same country)
CAPITALS = [
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("Japan", "Tokyo", "Osaka"),
    ("China", "Beijing", "Shanghai"),
    ("India", "New Delhi", "Mumbai"),
    ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"),
    ("Brazil", "Brasília", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "Córdoba"),
    ("Mexico", "Mexico City", "Guadalajara"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Norway", "Oslo", "Bergen"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Poland", "Warsaw", "Kraków"),
    ("Greece", "Athens", "Thessaloniki"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("South Korea", "Seoul", "Busan"),
    ("Thailand", "Bangkok", "Chiang Mai"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Ireland", "Dublin", "Cork"),
    ("Austria", "Vienna", "Salzburg"),
    ("the Czech Republic", "Prague", "Brno"),
    ("Peru", "Lima", "Cusco"),
    ("Chile", "Santiago", "Valparaíso"),
    ("Colombia", "Bogotá", "Medellín"),
    ("New Zealand", "Wellington", "Auckland"),
    ("Morocco", "Rabat", "Casablanca"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Pakistan", "Islamabad", "Karachi"),
    ("the United States", "Washington, D.C.", "New York City"),
    ("the United Kingdom", "London", "Manchester"),
]
CAPITAL_QUESTIONS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital of {c}.",
]

# Computed arithmetic: (kind, a, b). Answers are computed below, never typed by hand.
ARITH = [
    ("add", 17, 25), ("add", 48, 36), ("add", 125, 75), ("add", 238, 162),
    ("sub", 100, 37), ("sub", 81, 29), ("sub", 500, 125), ("sub", 73, 48),
    ("mul", 7, 8), ("mul", 6, 9), ("mul", 12, 12), ("mul", 15, 4), ("mul", 25, 8),
    ("div", 144, 12), ("div", 56, 7), ("div", 96, 8), ("div", 1000, 8),
    ("pct", 25, 80), ("pct", 15, 200), ("pct", 75, 40),
    ("sqrt", 81, None), ("sqrt", 169, None),
    ("square", 15, None), ("square", 20, None),
    ("pow", 2, 10), ("pow", 3, 4),
]
ARITH_QUESTIONS = {
    "add": ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}."],
    "sub": ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}."],
    "mul": ["What is {a} times {b}?", "What is {a} × {b}?", "Multiply {a} by {b}."],
    "div": ["What is {a} divided by {b}?", "What is {a} ÷ {b}?", "Divide {a} by {b}."],
    "pct": ["What is {a}% of {b}?", "Calculate {a}% of {b}."],
    "sqrt": ["What is the square root of {a}?"],
    "square": ["What is {a} squared?"],
    "pow": ["What is {a} to the power of {b}?"],
}
ARITH_ANSWERS = {
    "add": "{a} plus {b} is {r}.",
    "sub": "{a} minus {b} is {r}.",
    "mul": "{a} times {b} is {r}.",
    "div": "{a} divided by {b} is {r}.",
    "pct": "{a}% of {b} is {r}.",
    "sqrt": "The square root of {a} is {r}.",
    "square": "{a} squared is {r}.",
    "pow": "{a} to the power of {b} is {r}.",
}

# Hand-written number questions (word problems, fractions, primes); each checked by hand.
NUMBERS = [
    ("A shop sells pens for 3 dollars each. How much do 7 pens cost?",
     "7 pens cost 21 dollars.", "7 pens cost 24 dollars."),
    ("A train travels at 60 kilometers per hour for 3 hours. How far does it go?",
     "It travels 180 kilometers.", "It travels 120 kilometers."),
    ("I have 12 apples and give away 5. How many are left?",
     "You have 7 apples left.", "You have 8 apples left."),
    ("A pizza is cut into 8 slices and you eat 3. How many slices remain?",
     "5 slices remain.", "4 slices remain."),
    ("What is the average of 4, 8 and 12?",
     "The average is 8.", "The average is 12."),
    ("A rectangle is 5 cm wide and 9 cm long. What is its area?",
     "Its area is 45 square centimeters.", "Its area is 28 square centimeters."),
    ("What is the perimeter of a square with sides of 6 meters?",
     "The perimeter is 24 meters.", "The perimeter is 36 meters."),
    ("How many minutes are there from 2:15 pm to 3:00 pm?",
     "There are 45 minutes.", "There are 85 minutes."),
    ("A book costs 15 dollars and is 20% off. What is the sale price?",
     "The sale price is 12 dollars.", "The sale price is 13 dollars."),
    ("What is the next number in the sequence 2, 4, 8, 16?",
     "The next number is 32.", "The next number is 24."),
    ("Round 3.7 to the nearest whole number.",
     "3.7 rounds to 4.", "3.7 rounds to 3."),
    ("Is 17 a prime number?",
     "Yes, 17 is prime; its only divisors are 1 and 17.",
     "No, 17 is not prime because it is divisible by 3."),
    ("Is 21 a prime number?",
     "No, 21 is not prime because 21 = 3 × 7.",
     "Yes, 21 is prime; its only divisors are 1 and 21."),
    ("What is 1/2 plus 1/4?",
     "1/2 plus 1/4 is 3/4.", "1/2 plus 1/4 is 2/6."),
    ("What is 0.5 written as a percentage?",
     "0.5 is 50%.", "0.5 is 5%."),
    ("Which is larger, 0.7 or 0.65?",
     "0.7 is larger than 0.65.", "0.65 is larger than 0.7."),
    ("What is 3/4 as a decimal?",
     "3/4 is 0.75.", "3/4 is 0.34."),
]

UNITS = [
    ("How many centimeters are in a meter?",
     "There are 100 centimeters in a meter.", "There are 1,000 centimeters in a meter."),
    ("How many meters are in a kilometer?",
     "There are 1,000 meters in a kilometer.", "There are 100 meters in a kilometer."),
    ("How many millimeters are in a centimeter?",
     "There are 10 millimeters in a centimeter.", "There are 100 millimeters in a centimeter."),
    ("How many grams are in a kilogram?",
     "There are 1,000 grams in a kilogram.", "There are 100 grams in a kilogram."),
    ("How many grams are in 2.5 kilograms?",
     "2.5 kilograms is 2,500 grams.", "2.5 kilograms is 250 grams."),
    ("How many milliliters are in a liter?",
     "There are 1,000 milliliters in a liter.", "There are 100 milliliters in a liter."),
    ("How many seconds are in an hour?",
     "There are 3,600 seconds in an hour.", "There are 600 seconds in an hour."),
    ("How many hours are in a week?",
     "There are 168 hours in a week.", "There are 148 hours in a week."),
    ("How many minutes are in 3 hours?",
     "3 hours is 180 minutes.", "3 hours is 300 minutes."),
    ("How many days are in a leap year?",
     "A leap year has 366 days.", "A leap year has 365 days."),
    ("How many inches are in a foot?",
     "There are 12 inches in a foot.", "There are 10 inches in a foot."),
    ("How many feet are in a yard?",
     "There are 3 feet in a yard.", "There are 4 feet in a yard."),
    ("How many feet are in a mile?",
     "There are 5,280 feet in a mile.", "There are 5,000 feet in a mile."),
    ("How many ounces are in a pound?",
     "There are 16 ounces in a pound.", "There are 12 ounces in a pound."),
    ("How many centimeters are in an inch?",
     "One inch is exactly 2.54 centimeters.", "One inch is exactly 3 centimeters."),
    ("About how many kilometers are in a mile?",
     "A mile is about 1.61 kilometers.", "A mile is about 0.62 kilometers."),
    ("About how many pounds are in a kilogram?",
     "A kilogram is about 2.2 pounds.", "A kilogram is about 0.45 pounds."),
    ("What is 0 degrees Celsius in Fahrenheit?",
     "0 °C is 32 °F.", "0 °C is 0 °F."),
    ("What is 100 degrees Celsius in Fahrenheit?",
     "100 °C is 212 °F.", "100 °C is 180 °F."),
    ("What is 50 degrees Fahrenheit in Celsius?",
     "50 °F is 10 °C.", "50 °F is 18 °C."),
    ("What is 25 degrees Celsius in Fahrenheit?",
     "25 °C is 77 °F.", "25 °C is 57 °F."),
    ("At what temperature are Celsius and Fahrenheit equal?",
     "They are equal at -40 degrees.", "They are equal at 0 degrees."),
    ("How many bits are in a byte?",
     "There are 8 bits in a byte.", "There are 10 bits in a byte."),
    ("How many square meters are in a hectare?",
     "A hectare is 10,000 square meters.", "A hectare is 1,000 square meters."),
    ("How many quarts are in a US gallon?",
     "There are 4 quarts in a US gallon.", "There are 8 quarts in a US gallon."),
    ("How many seconds are in a day?",
     "There are 86,400 seconds in a day.", "There are 84,600 seconds in a day."),
    ("How many months have 31 days?",
     "Seven months have 31 days.", "Six months have 31 days."),
    ("How many years are in a century?",
     "A century is 100 years.", "A century is 1,000 years."),
    ("How many kilograms are in a metric ton?",
     "A metric ton is 1,000 kilograms.", "A metric ton is 2,000 kilograms."),
    ("How many minutes are in an hour and a half?",
     "An hour and a half is 90 minutes.", "An hour and a half is 150 minutes."),
]

FACTS = [
    ("What is the chemical symbol for gold?",
     "The chemical symbol for gold is Au.", "The chemical symbol for gold is Ag."),
    ("What is the chemical symbol for iron?",
     "The chemical symbol for iron is Fe.", "The chemical symbol for iron is Ir."),
    ("Which element has the chemical symbol K?",
     "K is the symbol for potassium.", "K is the symbol for krypton."),
    ("What is the atomic number of oxygen?",
     "Oxygen has atomic number 8.", "Oxygen has atomic number 16."),
    ("What is the chemical formula for water?",
     "The chemical formula for water is H2O.", "The chemical formula for water is HO2."),
    ("What gas do plants take in from the air for photosynthesis?",
     "Plants take in carbon dioxide.", "Plants take in helium."),
    ("Which gas makes up most of Earth's atmosphere?",
     "Nitrogen makes up most of Earth's atmosphere, about 78%.",
     "Oxygen makes up most of Earth's atmosphere, about 78%."),
    ("How many planets are in our solar system?",
     "There are eight planets in our solar system.", "There are twelve planets in our solar system."),
    ("Which planet is closest to the Sun?",
     "Mercury is the closest planet to the Sun.", "Venus is the closest planet to the Sun."),
    ("What is the largest planet in our solar system?",
     "Jupiter is the largest planet in our solar system.",
     "Saturn is the largest planet in our solar system."),
    ("Which planet is known as the Red Planet?",
     "Mars is known as the Red Planet.", "Jupiter is known as the Red Planet."),
    ("What is the nearest star to Earth?",
     "The Sun is the nearest star to Earth. After it comes Proxima Centauri.",
     "Sirius is the nearest star to Earth. After it comes the Sun."),
    ("At what temperature does water boil at sea level?",
     "Water boils at 100 °C (212 °F) at sea level.", "Water boils at 90 °C (194 °F) at sea level."),
    ("At what temperature does pure water freeze?",
     "Pure water freezes at 0 °C (32 °F).", "Pure water freezes at 10 °C (50 °F)."),
    ("How many bones are in the adult human body?",
     "An adult human body has 206 bones.", "An adult human body has 306 bones."),
    ("What organ pumps blood around the body?",
     "The heart pumps blood around the body.", "The liver pumps blood around the body."),
    ("What is the largest organ of the human body?",
     "The skin is the largest organ of the human body.",
     "The liver is the largest organ of the human body."),
    ("How many legs does a spider have?",
     "A spider has eight legs.", "A spider has six legs."),
    ("How many hearts does an octopus have?",
     "An octopus has three hearts.", "An octopus has one heart."),
    ("What is the fastest land animal?",
     "The cheetah is the fastest land animal.", "The lion is the fastest land animal."),
    ("What is the largest mammal?",
     "The blue whale is the largest mammal.", "The African elephant is the largest mammal."),
    ("What do bees make from nectar?",
     "Bees make honey from nectar.", "Bees make milk from nectar."),
    ("What is the largest ocean on Earth?",
     "The Pacific Ocean is the largest ocean on Earth.",
     "The Atlantic Ocean is the largest ocean on Earth."),
    ("What is the tallest mountain above sea level?",
     "Mount Everest is the tallest, at about 8,849 meters above sea level.",
     "Mont Blanc is the tallest, at about 8,849 meters above sea level."),
    ("What is the largest hot desert in the world?",
     "The Sahara is the largest hot desert in the world.",
     "The Gobi is the largest hot desert in the world."),
    ("Which is the largest country by area?",
     "Russia is the largest country by area.", "Canada is the largest country by area."),
    ("Who wrote 'Romeo and Juliet'?",
     "William Shakespeare wrote 'Romeo and Juliet'.", "Charles Dickens wrote 'Romeo and Juliet'."),
    ("Who painted the Mona Lisa?",
     "Leonardo da Vinci painted the Mona Lisa.", "Michelangelo painted the Mona Lisa."),
    ("Who wrote 'Pride and Prejudice'?",
     "Jane Austen wrote 'Pride and Prejudice'.", "Charlotte Brontë wrote 'Pride and Prejudice'."),
    ("Who developed the theory of relativity?",
     "Albert Einstein developed the theory of relativity.",
     "Isaac Newton developed the theory of relativity."),
    ("Who discovered penicillin?",
     "Alexander Fleming discovered penicillin in 1928.",
     "Louis Pasteur discovered penicillin in 1928."),
    ("Who was the first person to walk on the Moon?",
     "Neil Armstrong was the first person to walk on the Moon, in 1969.",
     "Buzz Aldrin was the first person to walk on the Moon, in 1969."),
    ("Who was the first President of the United States?",
     "George Washington was the first President of the United States.",
     "Thomas Jefferson was the first President of the United States."),
    ("In what year did World War II end?",
     "World War II ended in 1945.", "World War II ended in 1949."),
    ("What is the main language spoken in Brazil?",
     "The main language of Brazil is Portuguese.", "The main language of Brazil is Spanish."),
    ("How many strings does a standard guitar have?",
     "A standard guitar has six strings.", "A standard guitar has eight strings."),
    ("How many players does a soccer team have on the field?",
     "A soccer team has 11 players on the field.", "A soccer team has 9 players on the field."),
    ("How many sides does a hexagon have?",
     "A hexagon has six sides.", "A hexagon has eight sides."),
    ("What do the angles of a triangle add up to?",
     "The angles of a triangle add up to 180 degrees.",
     "The angles of a triangle add up to 360 degrees."),
    ("What is the smallest prime number?",
     "The smallest prime number is 2.", "The smallest prime number is 1."),
    ("What is pi rounded to two decimal places?",
     "Pi rounded to two decimal places is 3.14.", "Pi rounded to two decimal places is 3.41."),
    ("What does a barometer measure?",
     "A barometer measures air pressure.", "A barometer measures wind speed."),
    ("What is the pH of pure water at 25 °C?",
     "Pure water has a pH of 7 at 25 °C.", "Pure water has a pH of 1 at 25 °C."),
    ("What force keeps the planets in orbit around the Sun?",
     "Gravity keeps the planets in orbit around the Sun.",
     "Magnetism keeps the planets in orbit around the Sun."),
    ("How long does Earth take to orbit the Sun?",
     "Earth takes about 365.25 days to orbit the Sun.",
     "Earth takes about 30 days to orbit the Sun."),
    ("What are the three primary colors of light?",
     "The primary colors of light are red, green and blue.",
     "The primary colors of light are purple, orange and brown."),
]

DEFINITIONS = [
    ("What is a noun?",
     "A noun is a word that names a person, place, thing or idea.",
     "A noun is a word that describes an action."),
    ("What is a verb?",
     "A verb is a word for an action or a state, like 'run' or 'be'.",
     "A verb is a word for a place or an object, like 'table'."),
    ("What is an adjective?",
     "An adjective is a word that describes a noun, like 'red' or 'tall'.",
     "An adjective is a word that joins two sentences, like 'and'."),
    ("What is a synonym?",
     "A synonym is a word with the same or nearly the same meaning as another, like 'big' and 'large'.",
     "A synonym is a word with the opposite meaning of another, like 'big' and 'small'."),
    ("What is an antonym?",
     "An antonym is a word with the opposite meaning, like 'hot' and 'cold'.",
     "An antonym is a word that sounds the same as another, like 'pair' and 'pear'."),
    ("What is a prime number?",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself.",
     "A prime number is any odd number."),
    ("What is an even number?",
     "An even number is a whole number that divides exactly by 2, like 4 or 10.",
     "An even number is a number that ends in 5, like 15."),
    ("What is a fraction?",
     "A fraction is a part of a whole, written as one number over another, like 3/4.",
     "A fraction is any number bigger than 100."),
    ("What is an atom?",
     "An atom is the smallest unit of a chemical element.",
     "An atom is a group of cells in a living thing."),
    ("What is a molecule?",
     "A molecule is two or more atoms bonded together, like H2O.",
     "A molecule is a single electron."),
    ("What is photosynthesis?",
     "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and oxygen.",
     "Photosynthesis is how plants turn soil into sunlight."),
    ("What is gravity?",
     "Gravity is the force that pulls masses toward each other, such as objects toward Earth.",
     "Gravity is the force that pushes objects away from Earth."),
    ("What is evaporation?",
     "Evaporation is when a liquid turns into a gas, like a puddle drying in the sun.",
     "Evaporation is when a gas turns into a solid."),
    ("What is a mammal?",
     "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk.",
     "A mammal is a cold-blooded animal with scales that breathes through gills."),
    ("What is a herbivore?",
     "A herbivore is an animal that eats plants.",
     "A herbivore is an animal that eats only meat."),
    ("What is a peninsula?",
     "A peninsula is a piece of land surrounded by water on three sides.",
     "A peninsula is a piece of land surrounded by mountains on all sides."),
    ("What is a volcano?",
     "A volcano is an opening in Earth's crust where molten rock, ash and gas escape.",
     "A volcano is a deep valley carved by a river."),
    ("What is a glacier?",
     "A glacier is a large, slow-moving mass of ice on land.",
     "A glacier is a warm ocean current."),
    ("What is erosion?",
     "Erosion is the wearing away of rock and soil by water, wind or ice.",
     "Erosion is the cooling of lava into new rock."),
    ("What is an ecosystem?",
     "An ecosystem is a community of living things interacting with their environment.",
     "An ecosystem is a single animal that lives alone."),
    ("What is DNA?",
     "DNA is the molecule that carries the genetic instructions of living things.",
     "DNA is a kind of sugar that cells burn for energy."),
    ("What is a vaccine?",
     "A vaccine trains the immune system to recognize and fight a specific disease.",
     "A vaccine is a medicine that kills all the bacteria in the body."),
    ("What is friction?",
     "Friction is the force that resists motion between surfaces that touch.",
     "Friction is the force that makes objects float."),
    ("What is a hypothesis?",
     "A hypothesis is a testable prediction or explanation.",
     "A hypothesis is a fact that has already been proven."),
    ("What is inflation?",
     "Inflation is a general rise in prices over time, so money buys less.",
     "Inflation is a general fall in prices over time, so money buys more."),
    ("What is an algorithm?",
     "An algorithm is a step-by-step set of instructions for solving a problem.",
     "An algorithm is a type of computer screen."),
    ("What is a CPU?",
     "A CPU is the central processing unit, the part of a computer that carries out instructions.",
     "A CPU is the computer's power supply unit."),
    ("What is a variable in programming?",
     "A variable is a named place in a program that stores a value.",
     "A variable is a value in a program that can never change."),
    ("What is a compiler?",
     "A compiler translates source code into a program the computer can run.",
     "A compiler is a tool that deletes unused files."),
    ("What is a URL?",
     "A URL is a web address, such as https://example.com.",
     "A URL is a type of computer virus."),
    ("What is a haiku?",
     "A haiku is a short Japanese poem of three lines, traditionally with 5, 7 and 5 syllables.",
     "A haiku is a long Greek poem of fourteen lines."),
    ("What is a simile?",
     "A simile compares two things using 'like' or 'as', as in 'as brave as a lion'.",
     "A simile is a word that sounds like the noise it names, like 'buzz'."),
    ("What is a palindrome?",
     "A palindrome is a word or phrase that reads the same backwards, like 'level'.",
     "A palindrome is a word that has no vowels."),
    ("What is the radius of a circle?",
     "The radius is the distance from the center of a circle to its edge.",
     "The radius is the distance all the way around a circle."),
    ("What is the perimeter of a shape?",
     "The perimeter is the total length around the outside of a shape.",
     "The perimeter is the amount of space inside a shape."),
]

HOWTO = [
    ("How do I find the area of a rectangle?",
     "Multiply its length by its width.", "Add its length and its width."),
    ("How do I find the perimeter of a rectangle?",
     "Add the length and the width, then multiply by 2.", "Multiply the length by the width."),
    ("How do I find the area of a triangle?",
     "Multiply the base by the height, then divide by 2.",
     "Multiply the base by the height, then add 2."),
    ("How do I find the circumference of a circle?",
     "Multiply the diameter by pi.", "Multiply the radius by itself."),
    ("How do I calculate the average of some numbers?",
     "Add the numbers together and divide by how many there are.",
     "Multiply the numbers together and divide by 2."),
    ("How do I convert Celsius to Fahrenheit?",
     "Multiply by 9/5, then add 32.", "Multiply by 5/9, then subtract 32."),
    ("How do I convert Fahrenheit to Celsius?",
     "Subtract 32, then multiply by 5/9.", "Add 32, then multiply by 9/5."),
    ("How do I convert minutes to hours?",
     "Divide the number of minutes by 60.", "Multiply the number of minutes by 60."),
    ("How do I convert kilometers to miles?",
     "Multiply the kilometers by about 0.621.", "Multiply the kilometers by about 1.61."),
    ("How do I work out 10% of a number?",
     "Divide the number by 10.", "Multiply the number by 10."),
    ("How can I tell if a whole number is even?",
     "It is even if its last digit is 0, 2, 4, 6 or 8.",
     "It is even if its last digit is 1, 3, 5, 7 or 9."),
    ("How do I hard-boil an egg?",
     "Boil it for about 10 minutes, then cool it in cold water.",
     "Boil it for about 1 minute, then cool it in cold water."),
    ("How do I make a cup of tea with a tea bag?",
     "Pour hot water over the tea bag, steep it for 3 to 5 minutes, then remove the bag.",
     "Put the tea bag in cold water and drink it at once."),
    ("How do I print 'hello' in Python?",
     "Use print('hello').", "Use echo('hello')."),
    ("How do I get the length of a list in Python?",
     "Use len(my_list).", "Use my_list.length()."),
    ("How do I reverse a string in Python?",
     "Use slicing: s[::-1].", "Use s.reverse()."),
    ("How do I write a comment in Python?",
     "Start the comment with #.", "Start the comment with //."),
    ("How do I list the files in a directory on Linux?",
     "Run ls in that directory.", "Run cd in that directory."),
    ("How do I create a new directory on Linux?",
     "Run mkdir followed by the name, for example mkdir notes.",
     "Run rm followed by the name, for example rm notes."),
    ("How do I count the lines in a file on Linux?",
     "Run wc -l followed by the file name.", "Run ls -l followed by the file name."),
    ("How do I stop a running command in a terminal?",
     "Press Ctrl+C.", "Press Ctrl+S."),
    ("How do I check which version of Python 3 is installed?",
     "Run python3 --version.", "Run python3 --help."),
    ("How do I create and switch to a new branch in Git?",
     "Run git switch -c followed by the branch name.",
     "Run git merge followed by the branch name."),
    ("How do I see the commit history in Git?",
     "Run git log.", "Run git push."),
    ("How do I undo my last action in most programs?",
     "Press Ctrl+Z, or Cmd+Z on a Mac.", "Press Ctrl+P, or Cmd+P on a Mac."),
    ("How do I search for a word on a web page?",
     "Press Ctrl+F, or Cmd+F on a Mac, and type the word.",
     "Press Ctrl+W, or Cmd+W on a Mac, and type the word."),
    ("How do I check a subtraction answer?",
     "Add your answer to the number you subtracted; you should get the number you started with.",
     "Subtract your answer from itself; you should get the number you started with."),
]

# Word tasks. Reversals and counts are computed; the rest is hand-written.
REVERSE_WORDS = ["apple", "planet", "garden", "rocket", "window"]
LETTER_COUNT_WORDS = ["elephant", "library", "umbrella", "kitchen"]
VOWEL_COUNT_WORDS = ["education", "banana", "computer", "table"]
# (singular, plural, wrong plural)
PLURALS = [
    ("mouse", "mice", "mouses"), ("child", "children", "childs"), ("tooth", "teeth", "tooths"),
    ("goose", "geese", "gooses"), ("woman", "women", "womans"), ("knife", "knives", "knifes"),
]
# (verb, past tense, wrong past tense)
PAST_TENSES = [
    ("run", "ran", "runned"), ("go", "went", "goed"), ("eat", "ate", "eated"),
    ("swim", "swam", "swimmed"), ("write", "wrote", "writed"), ("think", "thought", "thinked"),
]
# (word, opposite, wrong answer)
OPPOSITES = [
    ("hot", "cold", "warm"), ("early", "late", "soon"), ("empty", "full", "hollow"),
    ("heavy", "light", "large"), ("increase", "decrease", "grow"),
]
# (word, synonym, wrong answer: an antonym)
SYNONYMS = [
    ("big", "large", "small"), ("happy", "glad", "sad"), ("fast", "quick", "slow"),
    ("begin", "start", "finish"), ("difficult", "hard", "easy"),
]
# (word, rhyme, non-rhyme)
RHYMES = [("cat", "hat", "dog"), ("moon", "spoon", "star"), ("cake", "lake", "pie"), ("rain", "train", "cloud")]
SORT_LISTS = [["pear", "apple", "mango"], ["zebra", "lion", "giraffe"], ["blue", "red", "green", "yellow"],
              ["river", "lake", "ocean", "pond"]]
WORD_MISC = [
    ("Which word is the odd one out: apple, banana, carrot, grape?",
     "Carrot is the odd one out; it is a vegetable and the others are fruits.",
     "Grape is the odd one out; it is a vegetable and the others are fruits."),
    ("Make a compound word from 'sun' and 'flower'.",
     "'Sun' and 'flower' make 'sunflower'.", "'Sun' and 'flower' make 'flowersun'."),
    ("Which letter comes after 'g' in the alphabet?",
     "The letter 'h' comes after 'g'.", "The letter 'f' comes after 'g'."),
    ("How many syllables are in the word 'banana'?",
     "'Banana' has three syllables.", "'Banana' has two syllables."),
    ("What is the contraction of 'do not'?",
     "'Do not' contracts to 'don't'.", "'Do not' contracts to 'doesn't'."),
]

TOPICS = {
    "capitals": "geography",
    "arithmetic": "numbers",
    "units": "units of measurement",
    "facts": "general knowledge",
    "definitions": "definitions",
    "howto": "practical tasks",
    "words": "words and spelling",
}


def fmt(n):
    return f"{n:,}"


def arith_item(rng, kind, a, b):
    if kind == "add":
        r = a + b
    elif kind == "sub":
        r = a - b
    elif kind == "mul":
        r = a * b
    elif kind == "div":
        assert a % b == 0
        r = a // b
    elif kind == "pct":
        assert (a * b) % 100 == 0
        r = a * b // 100
    elif kind == "sqrt":
        r = round(a ** 0.5)
        assert r * r == a
    elif kind == "square":
        r = a * a
    elif kind == "pow":
        r = a ** b
    else:
        raise ValueError(kind)
    fa, fb = fmt(a), (fmt(b) if b is not None else "")
    q = rng.choice(ARITH_QUESTIONS[kind]).format(a=fa, b=fb)
    deltas = [1, -1, 2, -2, 10, -10]
    if kind == "mul":
        deltas += [a, -a, b, -b]
    wrong = rng.choice([r + d for d in deltas if r + d > 0 and r + d != r])
    tmpl = ARITH_ANSWERS[kind]
    return q, tmpl.format(a=fa, b=fb, r=fmt(r)), tmpl.format(a=fa, b=fb, r=fmt(wrong))


def swap_adjacent(s, rng):
    idx = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
    i = rng.choice(idx)
    return s[:i] + s[i + 1] + s[i] + s[i + 2:]


def build_items(rng):
    """All (category, question, chosen, wrong) items, in a fixed order."""
    items = []
    for country, capital, wrong in CAPITALS:
        q = rng.choice(CAPITAL_QUESTIONS).format(c=country)
        lead = "The capital of " + country + " is "
        stop = "" if capital.endswith(".") else "."  # "Washington, D.C." already ends the sentence
        items.append(("capitals", q, lead + capital + stop, lead + wrong + "."))
    for kind, a, b in ARITH:
        items.append(("arithmetic",) + arith_item(rng, kind, a, b))
    for q, c, w in NUMBERS:
        items.append(("arithmetic", q, c, w))
    for cat, rows in (("units", UNITS), ("facts", FACTS), ("definitions", DEFINITIONS), ("howto", HOWTO)):
        for q, c, w in rows:
            items.append((cat, q, c, w))
    for w in REVERSE_WORDS:
        rev = w[::-1]
        items.append(("words", f"Spell the word '{w}' backwards.",
                      f"'{w}' spelled backwards is '{rev}'.",
                      f"'{w}' spelled backwards is '{swap_adjacent(rev, rng)}'."))
    for w in LETTER_COUNT_WORDS:
        n = len(w)
        items.append(("words", f"How many letters are in the word '{w}'?",
                      f"The word '{w}' has {n} letters.",
                      f"The word '{w}' has {n + rng.choice([-1, 1, 2])} letters."))
    for w in VOWEL_COUNT_WORDS:
        vs = [ch for ch in w if ch in "aeiou"]
        n = len(vs)
        listed = ", ".join(vs[:-1]) + " and " + vs[-1]
        items.append(("words", f"How many vowels are in the word '{w}'?",
                      f"The word '{w}' has {n} vowels: {listed}.",
                      f"The word '{w}' has {n + rng.choice([-1, 1, 2])} vowels."))
    for s, p, bad in PLURALS:
        items.append(("words", f"What is the plural of '{s}'?",
                      f"The plural of '{s}' is '{p}'.", f"The plural of '{s}' is '{bad}'."))
    for v, p, bad in PAST_TENSES:
        items.append(("words", f"What is the past tense of '{v}'?",
                      f"The past tense of '{v}' is '{p}'.", f"The past tense of '{v}' is '{bad}'."))
    for w, o, bad in OPPOSITES:
        items.append(("words", f"What is the opposite of '{w}'?",
                      f"The opposite of '{w}' is '{o}'.", f"The opposite of '{w}' is '{bad}'."))
    for w, s, bad in SYNONYMS:
        items.append(("words", f"Give a synonym for '{w}'.",
                      f"'{s.capitalize()}' is a synonym for '{w}'.",
                      f"'{bad.capitalize()}' is a synonym for '{w}'."))
    for w, r, bad in RHYMES:
        items.append(("words", f"Give a word that rhymes with '{w}'.",
                      f"'{r.capitalize()}' rhymes with '{w}'.",
                      f"'{bad.capitalize()}' rhymes with '{w}'."))
    for words in SORT_LISTS:
        good = sorted(words)
        bad = good[1:] + good[:1]  # rotated: not in order
        assert bad != good
        items.append(("words", "Put these words in alphabetical order: " + ", ".join(words) + ".",
                      "In alphabetical order: " + ", ".join(good) + ".",
                      "In alphabetical order: " + ", ".join(bad) + "."))
    for q, c, w in WORD_MISC:
        items.append(("words", q, c, w))
    return items


# ---------------------------------------------------------------------------------------------
# Rejected styles
# ---------------------------------------------------------------------------------------------

# Common sentence starters that should be lower-cased after a lead-in ("Basically, the ...").
# Anything else (names, numbers, quotes, abbreviations) keeps its first letter as it is.
LOWERABLE = {
    "A", "An", "Add", "Bees", "Boil", "Carrot", "Condensation", "Divide", "Earth", "Erosion",
    "Evaporation", "Friction", "Gravity", "In", "Inflation", "It", "Its", "Multiply", "Nitrogen",
    "Oxygen", "Photosynthesis", "Plants", "Pour", "Press", "Pure", "Run", "Seven", "Start",
    "Subtract", "The", "There", "They", "Magnetism", "Put", "Grape", "Use", "Water", "You", "Yes", "No", "Six", "One",
}


def decap(s):
    first = s.split(" ", 1)[0].rstrip(",;:")
    if first in LOWERABLE:
        return s[0].lower() + s[1:]
    return s


OPENERS = [
    "Great question!", "What a great question!", "Thanks for asking!",
    "Sure, I'd be happy to help with that!", "Absolutely, I can definitely help you with this.",
    "Of course! This is something a lot of people wonder about.", "Okay, so, let me explain.",
    "Well, that's a really interesting question.", "Good question, and I'm glad you asked.",
    "Alright, let me walk you through this.", "Oh, I love this question!",
]
LEADINS = [
    "Basically,", "So basically,", "To put it simply,", "Long story short,", "Essentially,",
    "Honestly,", "To answer your question,", "Simply put,", "Well,", "So,",
]
RESTATE = [
    "Again,", "Like I said,", "To repeat,", "Just to be clear,", "In other words,", "Once more,",
    "As I mentioned,", "So, to sum up,", "To say it again,",
]
CLOSERS = [
    "I hope this helps!", "Hope that helps, and let me know if you have any other questions!",
    "Let me know if you need anything else!", "I hope this answer was helpful and informative.",
    "Feel free to ask if you have more questions. Happy learning!", "I hope that clears things up!",
    "I really hope that helps you out!",
]
STRESSED = [
    "This is really, really important to know.",
    "It's a very, very, very common question.",
    "It's honestly one of those things, you know, one of those things.",
    "And that's really all there is to it, that's really all there is to it.",
    "It's super simple, super super simple.",
    "So yeah. Yeah. That's basically it, basically.",
]


def padded(rng, q, a, w, topic):
    o, l1, r1, r2, c1, s1 = (rng.choice(OPENERS), rng.choice(LEADINS), rng.choice(RESTATE),
                             rng.choice(RESTATE), rng.choice(CLOSERS), rng.choice(STRESSED))
    da = decap(a)
    return [
        f"{o} {l1} {da} {r1} {da} {c1}",
        f"{o} {s1} {a} {a} {r1} {da} {c1}",
        f"{l1} {da} That's right, {da} {r1} {da} {c1} {c1}",
        f"So, you know, basically, you know, {da} You know? {a} {s1} {c1}",
        f"{o} {o} {l1} {da} {s1} {c1}",
        f"{o} When it comes to {topic}, there is a lot to say, a lot to say. {l1} {da} {r1} {da} {c1}",
        f"{a} {r1} {da} {r2} {da} {s1}",
    ]


def rambling(rng, q, a, w, topic):
    da, dw, t = decap(a), decap(w), topic
    return [
        # restates the question, buries the answer, repeats it
        f'You are asking: "{q}" So the question is "{q}" That is a question a lot of people ask. '
        f"To answer it, I would say that {da} So yes, {da}",
        f'Okay, so "{q}" Let me think about that. Let me think. When it comes to {t}, there are many '
        f"things to think about, many, many things. I would say {da} I think. Yes, I think that is it.",
        f'Hmm, "{q}" Well, well, well. This is about {t}. I find {t} interesting. I find {t} really '
        f'interesting. Anyway, about "{q}": {a} Anyway, that is about {t}.',
        # restates the question and never gives an answer
        f'So you want to know: "{q}" Well, that depends. It really depends. It depends on a lot of '
        f"things, and it depends on how you look at it. With {t}, it always depends. So, it depends.",
        f'"{q}" That is the question. The question is "{q}" And the answer to the question is... well, '
        f"the answer to that question is the answer. I would need to think about it more, and think "
        f"about it more, before I could say.",
        f'Let me repeat the question: "{q}" Right. "{q}" This is a question about {t}, and questions '
        f"about {t} are questions that need careful thought. Very careful thought. I will have to come "
        f"back to it.",
        # restates the question and flip-flops between a wrong and the right answer
        f'Let me restate the question: "{q}" Okay. So, {dw} Wait, no. {a} Or was it... {dw} '
        f"Hmm. I think {da} Probably. Maybe.",
        f'"{q}" Good one. I believe {dw} Actually, hold on. Hold on. {a} Yes. Or no. I am not sure. '
        f"I am not sure, to be honest.",
    ]


# Which rambling templates give the right answer (buried), none, or flip-flop.
RAMBLING_KINDS = ["buried", "buried", "buried", "no-answer", "no-answer", "no-answer", "flip-flop",
                  "flip-flop"]


def words(s):
    return len(s.split())


def pick(rng, candidates):
    """Choose among the candidates that fit MAX_WORDS; fall back to the shortest."""
    ok = [i for i, c in enumerate(candidates) if words(c) <= MAX_WORDS]
    if ok:
        return rng.choice(ok)
    return min(range(len(candidates)), key=lambda i: words(candidates[i]))


def allocate(n, weights, rng):
    raw = [n * w for _, w in weights]
    counts = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: -(raw[i] - counts[i]))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    styles = [name for (name, _), k in zip(weights, counts) for _ in range(k)]
    rng.shuffle(styles)
    return styles


def split_items(items, rng):
    """Stratified split: about N_EVAL items for eval, proportional per category."""
    cats = []
    for it in items:
        if it[0] not in cats:
            cats.append(it[0])
    by_cat = {c: [it for it in items if it[0] == c] for c in cats}
    raw = {c: len(by_cat[c]) * N_EVAL / len(items) for c in cats}
    k = {c: int(raw[c]) for c in cats}
    for c in sorted(cats, key=lambda c: -(raw[c] - k[c]))[: N_EVAL - sum(k.values())]:
        k[c] += 1
    train, ev = [], []
    for c in cats:
        group = list(by_cat[c])
        rng.shuffle(group)
        ev += group[: k[c]]
        train += group[k[c]:]
    rng.shuffle(train)
    rng.shuffle(ev)
    return train, ev


def make_rows(items, rng):
    rows, meta = [], []
    for (cat, q, a, w), style in zip(items, allocate(len(items), STYLE_WEIGHTS, rng)):
        topic = TOPICS[cat]
        if style == "wrong":
            rej, sub = w, "wrong"
        elif style == "padded":
            cands = padded(rng, q, a, w, topic)
            i = pick(rng, cands)
            rej, sub = cands[i], f"padded-{i}"
        else:
            cands = rambling(rng, q, a, w, topic)
            i = pick(rng, cands)
            rej, sub = cands[i], "rambling-" + RAMBLING_KINDS[i]
        rows.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": rej}],
        })
        meta.append((cat, style, sub))
    return rows, meta


def generate():
    rng = random.Random(SEED)
    items = build_items(rng)
    train, ev = split_items(items, rng)
    train_rows, train_meta = make_rows(train, rng)
    eval_rows, eval_meta = make_rows(ev, rng)
    return {"train": (train_rows, train_meta), "eval": (eval_rows, eval_meta)}, items


def serialize(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------
# Validation and statistics
# ---------------------------------------------------------------------------------------------

def validate(texts):
    errors = []
    prompts = {}
    for split, text in texts.items():
        seen = set()
        for n, line in enumerate(text.splitlines(), 1):
            where = f"{split}.jsonl:{n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                errors.append(f"{where}: not JSON ({e})")
                continue
            if set(row) != {"prompt", "chosen", "rejected"}:
                errors.append(f"{where}: fields {sorted(row)}")
                continue
            for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
                msgs = row[key]
                if (not isinstance(msgs, list) or len(msgs) != 1 or msgs[0].get("role") != role
                        or not isinstance(msgs[0].get("content"), str) or not msgs[0]["content"].strip()):
                    errors.append(f"{where}: bad {key}")
            try:
                q, c, r = (row[k][0]["content"] for k in ("prompt", "chosen", "rejected"))
            except (KeyError, IndexError, TypeError):
                continue
            if c == r:
                errors.append(f"{where}: chosen == rejected")
            if words(c) > MAX_WORDS or words(r) > MAX_WORDS:
                errors.append(f"{where}: answer over {MAX_WORDS} words")
            if q in seen:
                errors.append(f"{where}: duplicate prompt {q!r}")
            seen.add(q)
        prompts[split] = seen
    both = prompts.get("train", set()) & prompts.get("eval", set())
    for q in sorted(both):
        errors.append(f"prompt in both train and eval: {q!r}")
    return errors


def stats(name, rows, meta):
    def summary(xs):
        xs = sorted(xs)
        return f"min {xs[0]:>3}  median {xs[len(xs) // 2]:>3}  mean {sum(xs) / len(xs):6.1f}  max {xs[-1]:>3}"

    out = [f"{name}: {len(rows)} pairs"]
    for field in ("prompt", "chosen", "rejected"):
        texts = [r[field][0]["content"] for r in rows]
        out.append(f"  {field:8} chars {summary([len(t) for t in texts])}")
        out.append(f"  {field:8} words {summary([words(t) for t in texts])}")
    def count(keyf):
        keys = []
        for m in meta:
            if keyf(m) not in keys:
                keys.append(keyf(m))
        return ", ".join(f"{k} {sum(1 for m in meta if keyf(m) == k)}" for k in sorted(keys))
    out.append("  styles:     " + count(lambda m: m[1]))
    out.append("  sub-styles: " + count(lambda m: m[2]))
    out.append("  categories: " + count(lambda m: m[0]))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out-dir", default=os.path.join(root, "data", "concise_prefs"))
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 unless the files in --out-dir are exactly what this script writes")
    ap.add_argument("--stats", action="store_true", help="print counts and length statistics")
    args = ap.parse_args()

    splits, items = generate()
    texts = {name: serialize(rows) for name, (rows, _) in splits.items()}
    errors = validate(texts)
    prompts = [it[1] for it in items]
    if len(set(prompts)) != len(prompts):
        errors.append("duplicate questions among the facts")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1

    if args.check:
        bad = []
        for name, text in texts.items():
            path = os.path.join(args.out_dir, name + ".jsonl")
            try:
                with open(path, "rb") as f:
                    on_disk = f.read()
            except OSError:
                on_disk = None
            if on_disk != text.encode("utf-8"):
                bad.append(path)
        if bad:
            print("out of date (rerun scripts/make_concise_prefs.py): " + ", ".join(bad), file=sys.stderr)
            return 1
        print(f"ok: {', '.join(f'{n} {len(r)}' for n, (r, _) in splits.items())} pairs match the generator")
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        for name, text in texts.items():
            path = os.path.join(args.out_dir, name + ".jsonl")
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            print(f"wrote {path} ({len(splits[name][0])} pairs)")
    if args.stats:
        print(f"{len(items)} distinct items")
        for name, (rows, meta) in splits.items():
            print(stats(name, rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
