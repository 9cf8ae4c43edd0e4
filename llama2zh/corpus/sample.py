"""The built-in bilingual story corpus: children's stories, English and Chinese in parallel.

Every story is composed from independent slots (a character, a place, an object, a problem,
a helper, an ending, ...). Each sentence is a pair of templates, one per language, written
so that the Chinese reads as Chinese (measure words, 他/她/它, Chinese punctuation) rather
than a word-by-word translation, and so that both languages split into the same number of
sentences. A problem is a list of beats; a beat is a tuple of alternative sentence pairs
(None among them: the beat may be left out) or the name of a per-story slot holding one.

write_sample() writes TinyStories' shard layout: dest/data00.json, data01.json, ..., each a
JSON array of {"id", "story" (Chinese), "story_en"} records. The same seed gives the same bytes.
make_story_with_slots() also returns the slots a story was made from, so that sample_sft can
build conversations about it whose answers are true by construction.
"""

from __future__ import annotations

import json
import random
import re
from collections import namedtuple
from pathlib import Path

from llama2zh.errors import UserError
from llama2zh.fileio import atomic_write_bytes

MIN_SENTENCES, MAX_SENTENCES = 5, 12
SENTENCE = re.compile(r'[^.!?。！？]*[.!?。！？]+["”]?')

# Characters: (weight, English, Chinese, measure word, Chinese pronoun, names); a name is
# (English, Chinese, English pronoun). Animals are 它 in Chinese, he or she in English.
GIRLS = tuple((en, zh, "she") for en, zh in (
    ("Lily", "莉莉"), ("Mia", "米娅"), ("Anna", "安娜"), ("Lucy", "露西"), ("Emma", "艾玛"), ("Amy", "艾米"),
    ("Sara", "萨拉"), ("Zoe", "佐伊"), ("Ella", "艾拉"), ("Rose", "萝丝"), ("Kate", "凯特"), ("Xiaohong", "小红"),
    ("Xiaomei", "小美"), ("Nana", "娜娜")))
BOYS = tuple((en, zh, "he") for en, zh in (
    ("Tom", "汤姆"), ("Ben", "本"), ("Tim", "蒂姆"), ("Max", "马克斯"), ("Sam", "萨姆"), ("Jack", "杰克"),
    ("Leo", "利奥"), ("Bob", "鲍勃"), ("Timmy", "蒂米"), ("Joe", "乔"), ("Xiaoming", "小明"), ("Lele", "乐乐"),
    ("Dingding", "丁丁"), ("Dongdong", "东东")))
PETS = (("Spot", "斑斑", "he"), ("Fluffy", "毛毛", "she"), ("Coco", "可可", "she"), ("Buddy", "巴迪", "he"),
        ("Pip", "皮皮", "he"), ("Bella", "贝拉", "she"), ("Rosie", "萝茜", "she"), ("Benny", "本尼", "he"),
        ("Doudou", "豆豆", "he"), ("Huahua", "花花", "she"), ("Tutu", "图图", "he"), ("Mimi", "咪咪", "she"),
        ("Snowy", "雪球", "she"), ("Brownie", "布朗尼", "he"))
KINDS = ((10, "little girl", "小女孩", "个", "她", GIRLS), (6, "little boy", "小男孩", "个", "他", BOYS),
         (1, "puppy", "小狗", "只", "它", PETS), (1, "kitten", "小猫", "只", "它", PETS),
         (1, "bunny", "小兔子", "只", "它", PETS), (1, "little bird", "小鸟", "只", "它", PETS),
         (1, "bear cub", "小熊", "只", "它", PETS), (1, "duckling", "小鸭子", "只", "它", PETS),
         (1, "little fox", "小狐狸", "只", "它", PETS), (1, "little mouse", "小老鼠", "只", "它", PETS),
         (1, "squirrel", "小松鼠", "只", "它", PETS), (1, "little elephant", "小象", "头", "它", PETS),
         (1, "pony", "小马", "匹", "它", PETS))
TRAITS = (("kind", "善良的"), ("curious", "好奇的"), ("brave", "勇敢的"), ("shy", "害羞的"), ("happy", "快乐的"),
          ("clever", "聪明的"), ("cheerful", "开朗的"), ("gentle", "温柔的"), ("playful", "爱玩的"),
          ("friendly", "友好的"), ("lively", "活泼的"))
HOMES = (("in a small house by the sea", "海边的一座小房子里"), ("in a little village", "一个小村庄里"),
         ("in a big green forest", "一片绿绿的大森林里"), ("on a busy street in the city", "城市里一条热闹的街道上"),
         ("on a big farm", "一个大农场上"),
         ("in a cozy house on a hill", "山坡上一座温暖的房子里"),
         ("near a quiet lake", "一个安静的湖边"), ("in a house next to a big garden", "一座挨着大花园的房子里"))
HOBBIES = (("play in the sun", "在阳光下玩耍"), ("sing songs", "唱歌"), ("draw pictures", "画画"),
           ("run and jump", "跑跑跳跳"), ("look at the stars", "看星星"), ("dance", "跳舞"),
           ("play with blocks", "搭积木"), ("pick flowers", "摘花"), ("read picture books", "看图画书"),
           ("splash in puddles", "踩水坑"), ("chase butterflies", "追蝴蝶"), ("play hide and seek", "玩捉迷藏"),
           ("blow bubbles", "吹泡泡"), ("build sand castles", "堆沙堡"))
WHEN = (("One day", "有一天"), ("One morning", "一天早上"), ("One afternoon", "一天下午"),
        ("One sunny day", "一个阳光明媚的日子"), ("On Saturday", "星期六"), ("After lunch", "吃过午饭后"),
        ("One bright morning", "一个晴朗的早晨"), ("One warm spring day", "一个暖和的春日"))

# Places: (English, English "at", Chinese "go to", Chinese "at", descriptions, spots to look in).
PLACES = (
    ("the park", "at the park", "公园", "公园里",
     (("The grass was green and the flowers were bright.", "草地绿绿的，花儿开得正艳。"),
      ("Children were playing on the swings.", "孩子们在荡秋千。")),
     (("under a bench", "一张长椅下面"), ("behind a big tree", "一棵大树后面"), ("in the sandbox", "沙坑里"))),
    ("the beach", "at the beach", "海边", "海边",
     (("The sand was warm and the waves were big.", "沙子暖暖的，海浪很大。"),
      ("Seagulls flew over the blue sea.", "海鸥在蓝色的大海上飞。")),
     (("under a pile of sand", "一堆沙子下面"), ("next to a big rock", "一块大石头旁边"),
      ("behind a sand castle", "一座沙堡后面"))),
    ("the forest", "in the forest", "森林", "森林里",
     (("The trees were tall and the birds were singing.", "树木高高的，小鸟在唱歌。"),
      ("Sunlight came down through the leaves.", "阳光从树叶间洒了下来。")),
     (("under a big leaf", "一片大叶子下面"), ("behind an old log", "一根老木头后面"),
      ("in a pile of leaves", "一堆落叶里"))),
    ("the garden", "in the garden", "花园", "花园里",
     (("Red and yellow flowers grew everywhere.", "到处都开着红色和黄色的花。"),
      ("Bees were buzzing around the roses.", "蜜蜂围着玫瑰花嗡嗡地飞。")),
     (("under a rose bush", "玫瑰花丛下面"), ("next to the watering can", "洒水壶旁边"),
      ("behind the flower pots", "花盆后面"))),
    ("the farm", "on the farm", "农场", "农场上",
     (("There were cows, pigs and hens.", "那里有奶牛、小猪和母鸡。"),
      ("A big red barn stood in the field.", "田野里有一座红色的大谷仓。")),
     (("in the hay", "干草堆里"), ("behind the barn", "谷仓后面"), ("next to the pig pen", "猪圈旁边"))),
    ("the lake", "by the lake", "湖边", "湖边",
     (("The water was calm and blue.", "湖水蓝蓝的，很平静。"),
      ("Ducks were swimming on the water.", "鸭子在水上游来游去。")),
     (("in the tall reeds", "高高的芦苇丛里"), ("under a small boat", "一条小船下面"), ("next to the water", "水边"))),
    ("the big hill", "on the hill", "山坡上", "山坡上",
     (("The wind was soft and the sky was wide.", "风轻轻的，天空很开阔。"),
      ("From the top, {he} could see the whole town.", "从坡顶上，{ta}能看到整个小镇。")),
     (("behind a big rock", "一块大石头后面"), ("in the tall grass", "高高的草丛里"),
      ("under a bush", "一丛灌木下面"))),
    ("the market", "at the market", "集市", "集市上",
     (("There were fruits, bread and toys for sale.", "那里卖水果、面包和玩具。"),
      ("Many people were talking and laughing.", "很多人在说说笑笑。")),
     (("under a fruit stand", "一个水果摊下面"), ("next to a basket of apples", "一筐苹果旁边"),
      ("behind a big box", "一个大箱子后面"))),
    ("the playground", "at the playground", "游乐场", "游乐场里",
     (("There was a tall slide and a big sandbox.", "那里有高高的滑梯和大大的沙坑。"),
      ("Kids were laughing on the swings.", "孩子们在秋千上笑着。")),
     (("under the slide", "滑梯下面"), ("in the sandbox", "沙坑里"), ("next to the swings", "秋千旁边"))),
    ("the river", "by the river", "河边", "河边",
     (("The water sang as it ran over the stones.", "河水流过石头，哗哗地唱着歌。"),
      ("Little fish swam in the clear water.", "小鱼在清清的河水里游。")),
     (("under a flat stone", "一块扁扁的石头下面"), ("in the soft mud", "软软的泥巴里"),
      ("behind a bush by the water", "水边的灌木丛后面"))),
)

# Objects: (English, Chinese, measure word); FLYERS are the ones the wind can carry into a tree.
FLYERS = (("ball", "球", "个"), ("kite", "风筝", "只"), ("hat", "帽子", "顶"), ("scarf", "围巾", "条"),
          ("balloon", "气球", "个"))
TOYS = FLYERS + (("teddy bear", "玩具熊", "只"), ("doll", "布娃娃", "个"), ("toy car", "玩具车", "辆"),
                 ("book", "书", "本"), ("toy boat", "玩具船", "只"), ("necklace", "项链", "条"),
                 ("shell", "贝壳", "个"), ("drum", "小鼓", "面"), ("yo-yo", "悠悠球", "个"))
COLORS = (("red", "红色的"), ("blue", "蓝色的"), ("yellow", "黄色的"), ("green", "绿色的"), ("pink", "粉色的"),
          ("orange", "橙色的"), ("purple", "紫色的"), ("shiny", "亮晶晶的"), ("little", "小小的"), ("new", "新"),
          ("beautiful", "漂亮的"), ("old", "旧旧的"))

# Helpers: (first mention, later mentions) in English and Chinese.
FAMILY = tuple((en, zh, en, zh) for en, zh in (
    ("{his} mom", "妈妈"), ("{his} dad", "爸爸"), ("{his} grandma", "奶奶"), ("{his} grandpa", "爷爷"),
    ("{his} big sister", "姐姐"), ("{his} big brother", "哥哥")))
STRANGERS = (("a wise old owl", "一只聪明的老猫头鹰", "the owl", "猫头鹰"),
             ("a kind old man", "一位和蔼的老爷爷", "the old man", "老爷爷"),
             ("a friendly dog", "一只友好的大狗", "the dog", "大狗"),
             ("a friendly robin", "一只友好的知更鸟", "the robin", "知更鸟"),
             ("a big brown bear", "一只棕色的大熊", "the bear", "大熊"),
             ("a kind lady", "一位好心的阿姨", "the lady", "阿姨"),
             ("a tall giraffe", "一只高高的长颈鹿", "the giraffe", "长颈鹿"),
             ("a clever old turtle", "一只聪明的老乌龟", "the turtle", "老乌龟"))
ANYONE = FAMILY + STRANGERS

CREATURES = (("duckling", "小鸭子"), ("baby bird", "鸟宝宝"), ("kitten", "小猫咪"), ("turtle", "小乌龟"),
             ("baby rabbit", "兔宝宝"), ("frog", "小青蛙"), ("lamb", "小羊羔"), ("baby deer", "小鹿"),
             ("hedgehog", "小刺猬"))
# Troubles: (English, English in the first person, Chinese, how it is put right).
TROUBLES = (
    ("could not find its mom", "can't find my mom", "找不到妈妈了",
     ("{name} helped the {creature} look everywhere, and soon they found its mom.",
      "{name}帮{creature}到处找，很快就找到了它的妈妈。")),
    ("had hurt its leg", "hurt my leg", "弄伤了腿",
     ("{name} gently wrapped its leg with a soft leaf.", "{name}用一片软软的叶子，轻轻地把它的腿包好。")),
    ("was very hungry", "am so hungry", "肚子好饿",
     ("{name} shared {his} snack with the {creature}.", "{name}把自己的点心分给了{creature}。")),
    ("was cold and wet", "am cold and wet", "又冷又湿",
     ("{name} wrapped the {creature} in {his} warm scarf.", "{name}用自己暖和的围巾把{creature}裹了起来。")),
    ("was stuck in a hole", "am stuck in this hole", "掉进洞里出不来了",
     ("{name} reached down and gently lifted the {creature} out.", "{name}把手伸下去，轻轻地把{creature}抱了出来。")),
)
# Projects: (what, what goes wrong, how it ends) in English and Chinese.
PROJECTS = (
    ("build a tall tower of blocks", "用积木搭一座高高的塔", "the tower fell down", "塔倒了",
     "the tower stood tall and strong", "高高的塔稳稳地立住了"),
    ("bake cookies", "烤饼干", "the cookies got burned", "饼干烤焦了",
     "the cookies came out warm and sweet", "饼干烤好了，又香又甜"),
    ("draw a picture of a cat", "画一只猫", "the cat looked like a potato", "画出来的猫像个土豆",
     "the picture looked just like a real cat", "画出来的猫和真的一模一样"),
    ("learn to ride a bike", "学骑自行车", "the bike wobbled and fell over", "车子摇摇晃晃地倒了",
     "the bike rolled smoothly down the street", "车子稳稳地向前骑出去了"),
    ("make a paper boat", "折一只纸船", "the paper boat fell apart", "纸船散开了",
     "the little boat floated on the water", "小纸船在水上漂起来了"),
    ("tie a pretty bow", "打一个漂亮的蝴蝶结", "the bow came loose", "蝴蝶结松开了",
     "the bow was neat and pretty", "蝴蝶结又整齐又漂亮"),
    ("make a snowman", "堆一个雪人", "the snowman's head fell off", "雪人的头掉了",
     "the snowman stood tall with a carrot nose", "雪人站得高高的，还有一个胡萝卜鼻子"),
    ("sing a new song", "唱一首新歌", "the high notes came out wrong", "高音唱跑调了",
     "the song sounded sweet and clear", "歌声又甜又清亮"),
)
FAMILIES = (("mom and dad", "爸爸妈妈"), ("grandma", "奶奶"), ("grandpa and grandma", "爷爷奶奶"),
            ("big sister", "姐姐"), ("little brother", "弟弟"), ("mom", "妈妈"), ("dad", "爸爸"),
            ("baby sister", "小妹妹"))
BREAKABLES = (("vase", "花瓶"), ("cup", "杯子"), ("lamp", "台灯"), ("plate", "盘子"), ("clock", "钟"), ("bowl", "碗"))
CHASES = (("a pretty butterfly", "一只漂亮的蝴蝶"), ("a little rabbit", "一只小兔子"),
          ("a big red balloon", "一个红色的大气球"), ("a yellow bird", "一只黄色的小鸟"),
          ("a shiny bubble", "一个亮晶晶的泡泡"), ("a funny frog", "一只有趣的青蛙"))
INDOORS = (("{name} and {helper} built a big fort with pillows and blankets.",
            "{name}和{helper}用枕头和毯子搭了一座大城堡。"),
           ("{name} and {helper} baked a cake and got flour everywhere.",
            "{name}和{helper}烤了一个蛋糕，弄得到处都是面粉。"),
           ("{name} and {helper} played hide and seek in every room.", "{name}和{helper}在每个房间里玩捉迷藏。"),
           ("{name} and {helper} made a puppet show with old socks.", "{name}和{helper}用旧袜子演了一场木偶戏。"),
           ("{name} and {helper} painted pictures of the sun and the sea.", "{name}和{helper}画了太阳和大海。"),
           ("{name} and {helper} danced to music in the living room.", "{name}和{helper}在客厅里跟着音乐跳舞。"))

OPENINGS = (
    ("Once upon a time, there was {a_kind} named {name}.", "从前，有{a_kind}，名叫{name}。"),
    ("Once upon a time, there was {a_kind} called {name}.", "从前，有{a_kind}叫{name}。"),
    ("Once upon a time, there was {a_kind} named {name}. {He} lived {home} with {his} {family}.",
     "从前，有{a_kind}，名叫{name}。{ta}和{family}住在{home}。"),
    ("Once upon a time, {home}, there lived {a_kind} named {name}.", "从前，在{home}，住着{a_kind}，名叫{name}。"),
    ("There was once {a_kind} named {name}.", "很久以前，有{a_kind}，名叫{name}。"),
    ("{name} was {a_kind} who lived {home}.", "{name}是{a_kind}，住在{home}。"),
)
OPENING_WEIGHTS = (4, 2, 2, 1, 1, 1)  # mostly "Once upon a time, there was ..." / "从前，有..."
HOBBY = (None, ("{He} loved to {hobby}.", "{ta}最喜欢{hobby}。"),
         ("Every day, {he} liked to {hobby} with {his} {family}.", "{ta}每天都喜欢和{family}一起{hobby}。"),
         ("More than anything, {name} liked to {hobby}.", "{name}最爱做的事就是{hobby}。"))
TRIP = (("{when}, {name} went to {place}{company}.", "{when}，{name}{company}去了{place}。"),
        ("{when}, {name} went to play {at}{company}.", "{when}，{name}{company}去{place}玩。"),
        ("{when}, {name} decided to visit {place}{company}.", "{when}，{name}决定{company}去{place}看看。"))
TRIP_WITH_OBJECT = (("{when}, {name} took {a_obj} to {place}{company}.",
                     "{when}，{name}{company}带着{a_obj}去了{place}。"),
                    ("{when}, {name} took {his} {obj} to {place}{company}.",
                     "{when}，{name}{company}带着{ta}的{obj}去了{place}。"))
DESCRIBE = (None, "desc")  # the place's description, or nothing

Problem = namedtuple("Problem", "kind beats helpers objects")
PROBLEMS = (
    Problem("lost_toy", objects=TOYS, helpers=ANYONE, beats=(  # a lost toy, found with a helper
        TRIP_WITH_OBJECT, DESCRIBE,
        (None, ("{name} played with the {obj} all morning.", "{name}玩{obj}玩了一上午。"),
         ("{He} played and played until {he} was tired.", "{ta}玩啊玩，一直玩到累了。")),
        (("But when it was time to go home, the {obj} was gone!", "可是到了该回家的时候，{obj}不见了！"),
         ("Suddenly, {name} could not find {his} {obj}.", "突然，{name}找不到{ta}的{obj}了。"),
         ("Then {name} looked down, and the {obj} was gone!", "后来{name}低头一看，{obj}不见了！")),
        (('{name} cried, "Oh no! Where is my {obj}?"', "{name}哭着说：“哦，不！我的{obj}在哪里？”"),
         ("{name} looked everywhere, but {he} could not find it.", "{name}到处找，可是怎么也找不到。"),
         ("{name} felt so sad that {he} began to cry.", "{name}难过得哭了起来。")),
        (('{helper_a} saw {name} and asked, "What is wrong?"', "{helper_a}看见了{name}，问道：“怎么了？”"),
         ('{helper_a} came over and asked, "Why are you sad?"', "{helper_a}走过来问：“你为什么难过呀？”")),
        (('{helper} said, "Don\'t worry. We will find your {obj} together."',
          "{helper}说：“别担心。我们一起找你的{obj}吧。”"),
         ('{helper} smiled and said, "Let\'s look for it together."', "{helper}笑着说：“我们一起来找吧。”")),
        (("They looked {spot1}, and at last they found the {obj} {spot2}!",
          "他们先在{spot1}找了找，最后终于在{spot2}找到了{obj}！"),
         ("They looked {spot1} and {spot2}, and there it was!",
          "他们在{spot1}找了找，又到{spot2}看了看，原来它就在那里！")),
        (('{name} hugged {helper} and said, "Thank you!"', "{name}抱住{helper}说：“谢谢你！”"),
         ("{name} was so happy that {he} jumped up and down.", "{name}高兴得跳了起来。")),
        (None, ("From that day on, {name} always took good care of {his} {obj}.",
                "从那天起，{name}总是把自己的{obj}保管得好好的。"),
         ("{name} learned that it is good to ask for help.", "{name}明白了，遇到困难时可以请别人帮忙。")),
    )),
    Problem("toy_in_tree", objects=FLYERS, helpers=ANYONE, beats=(  # the wind carries a toy into a tree
        TRIP_WITH_OBJECT, DESCRIBE,
        (None, ("{name} played happily with the {obj}.", "{name}开开心心地玩着{obj}。")),
        (("Suddenly, a strong wind blew the {obj} up into a tall tree.", "突然，一阵大风把{obj}吹到了一棵高高的树上。"),
         ("Then the wind came, and the {obj} got stuck high in a tree.", "这时起风了，{obj}被挂在了高高的树上。")),
        (("{name} jumped and jumped, but the tree was too tall.", "{name}跳啊跳，可是树太高了。"),
         ("{name} tried to climb the tree, but {he} was too small.", "{name}想爬上树去，可是{ta}太小了。")),
        (None, ('{name} cried, "I can\'t reach it!"', "{name}哭着说：“我够不着！”")),
        (("{helper_a} heard {name} and came to help.", "{helper_a}听见了{name}的声音，过来帮忙。"),
         ('{helper_a} came by and said, "Let me help you."', "{helper_a}走过来说：“让我来帮你吧。”")),
        (("{helper} found a long stick and gently pushed the {obj} down.",
          "{helper}找来一根长长的树枝，轻轻地把{obj}拨了下来。"),
         ("With a long stick, {helper} got the {obj} out of the tree.",
          "{helper}用一根长棍子，把{obj}从树上弄了下来。")),
        (('{name} smiled and said, "Thank you for helping me!"', "{name}笑着说：“谢谢你帮助我！”"),
         ("{name} thanked {helper} with a big hug.", "{name}给了{helper}一个大大的拥抱，表示感谢。")),
        (None, ("After that, {name} always played with the {obj} far from the trees.",
                "从那以后，{name}总是在离大树远远的地方玩{obj}。"),
         ("{name} learned that it is good to ask for help.", "{name}明白了，遇到困难时可以请别人帮忙。")),
    )),
    Problem("sharing", objects=TOYS, helpers=ANYONE, beats=(  # learning to share
        (("{name} had {a_obj} that {he} loved very much.", "{name}有{a_obj}，{ta}非常喜欢它。"),
         ("{name} got {a_obj} for {his} birthday.", "{name}过生日时得到了{a_obj}。")),
        (("{when}, {name} took the {obj} to {place}{company}.", "{when}，{name}{company}带着{obj}去了{place}。"),),
        (('{friend_a} came over and asked, "Can I play with your {obj}?"',
          "{friend_a}走过来问：“我可以玩你的{obj}吗？”"),),
        (('But {name} held the {obj} tight and said, "No! The {obj} is mine."',
          "可是{name}紧紧抱着{obj}说：“不行！{obj}是我的。”"),
         ('{name} shook {his} head and said, "No, you can\'t."', "{name}摇摇头说：“不，不可以。”")),
        (("{friend} walked away with a sad face.", "{friend}难过地走开了。"),
         ("{friend} looked down and walked away.", "{friend}低下头，走开了。")),
        (("Soon {name} felt sad too, because playing alone was no fun.",
          "没过多久，{name}也难过起来，因为一个人玩一点儿也没意思。"),
         ("{name} played alone, but {he} did not feel happy.", "{name}一个人玩，可是一点儿也不开心。")),
        (('{name} ran to {friend} and said, "I am sorry. Let\'s play with the {obj} together!"',
          "{name}跑到{friend}身边说：“对不起。我们一起玩{obj}吧！”"),
         ('{name} gave the {obj} to {friend} and said, "You can have a turn."',
          "{name}把{obj}递给{friend}，说：“你先玩一会儿吧。”")),
        (("{name} and {friend} took turns and laughed all afternoon.", "{name}和{friend}轮流玩，笑了一下午。"),
         ("They played with the {obj} together until it was time to go home.",
          "他们一起玩{obj}，一直玩到该回家的时候。")),
        (("{name} learned that sharing makes everyone happy.", "{name}明白了，分享能让大家都快乐。"),
         ("From then on, {name} and {friend} were best friends.", "从那以后，{name}和{friend}成了最好的朋友。"),
         ("Sharing the {obj} made the day twice as fun.", "一起分享{obj}，让这一天变得加倍快乐。")),
    )),
    Problem("helping_animal", objects=TOYS, helpers=ANYONE, beats=(  # helping a small animal in trouble
        TRIP, DESCRIBE,
        (("{at}, {name} heard a small cry.", "在{at}，{name}听到了一声小小的哭声。"),
         ("Near a bush, {name} heard someone crying.", "在一丛灌木旁边，{name}听到有谁在哭。")),
        (("It was {a_creature}.", "原来是{a_creature}。"),
         ("{name} looked and found {a_creature}.", "{name}走过去一看，发现了{a_creature}。")),
        (("The {creature} was crying because it {trouble}.", "{creature}在哭，因为它{trouble}。"),
         ('{name} asked, "Why are you crying?" The {creature} said, "I {trouble_me}."',
          "{name}问：“你为什么哭呀？”{creature}说：“我{trouble}。”")),
        (('{name} said, "Don\'t be sad. I will help you, {creature}."', "{name}说：“别难过。{creature}，我来帮你。”"),
         ("{name} wanted to help.", "{name}很想帮帮它。")),
        "fix",
        (('The {creature} said, "Thank you, {name}!"', "{creature}说：“谢谢你，{name}！”"),
         ("The {creature} was happy again.", "{creature}又开心起来了。")),
        (("{name} felt warm inside, because helping others feels good.",
          "{name}心里暖暖的，因为帮助别人是一件快乐的事。"),
         ("{name} smiled all the way home.", "{name}一路笑着回了家。"),
         ("From that day on, {name} and the {creature} were good friends.",
          "从那天起，{name}和{creature}成了好朋友。")),
    )),
    Problem("trying_again", objects=TOYS, helpers=FAMILY, beats=(  # trying again
        (("{when}, {name} wanted to {project}.", "{when}，{name}想{project}。"),),
        (("{He} tried, but {fail}.", "{ta}试了试，可是{fail}。"),),
        (None, ("{name} tried again, but it still did not work.", "{name}又试了一次，可是还是不行。")),
        (('{name} said, "This is too hard. I can\'t {project}!"', "{name}说：“这太难了。我没办法{project}！”"),
         ("{name} felt so upset that {he} wanted to give up.", "{name}难过极了，想要放弃。")),
        (('{helper} sat down next to {name} and said, "Don\'t give up. We can {project} together, {name}."',
          "{helper}坐到{name}身边说：“别放弃。{name}，我们可以一起{project}。”"),),
        (("This time, {helper} and {name} went slowly and carefully.", "这一次，{helper}和{name}慢慢地、仔细地做。"),
         ("{helper} showed {name} a little trick.", "{helper}教了{name}一个小窍门。")),
        (("At last, {done}!", "终于，{done}！"),
         ("After a few more tries, {done}, and {name} clapped {his} hands.",
          "又试了几次以后，{done}，{name}高兴得拍起手来。")),
        (('{name} shouted, "I did it!"', "{name}大声喊道：“我做到了！”"),
         ("{name} was very proud.", "{name}非常自豪。")),
        (None, ("{name} learned that if you keep trying, you can do hard things.",
                "{name}明白了，只要一直努力，再难的事也能做到。"),
         ("It was a good lesson for {name}: never give up.", "这是{name}学到的很好的一课：永远不要放弃。")),
    )),
    Problem("telling_truth", objects=TOYS, helpers=FAMILY, beats=(  # telling the truth
        (("{when}, {name} was playing ball in the house.", "{when}，{name}在屋子里玩球。"),
         ("{when}, {name} was running around the living room.", "{when}，{name}在客厅里跑来跑去。")),
        (("With a loud crash, {he} bumped into the table, and {helper}'s {breakable} fell and broke.",
          "哗啦一声，{ta}撞到了桌子，{helper}的{breakable}掉下来摔碎了。"),
         ("{name} bumped into the shelf, and {helper}'s {breakable} fell to the floor and broke.",
          "{name}撞到了架子，{helper}的{breakable}掉到地上摔碎了。")),
        (("{name} was scared and wanted to hide the pieces.", "{name}很害怕，想把碎片藏起来。"),
         ("{name} felt scared. Maybe {helper} would not see the broken {breakable}.",
          "{name}很害怕。也许{helper}不会发现{breakable}碎了吧。")),
        (None, ("But then {he} took a deep breath and went to find {helper}.",
                "可是{ta}深深地吸了一口气，去找{helper}了。")),
        (('{name} said, "I am sorry, I broke your {breakable}."', "{name}说：“对不起，我把你的{breakable}打碎了。”"),),
        (('{helper} gave {name} a hug and said, "Thank you for telling me the truth."',
          "{helper}抱了抱{name}，说：“谢谢你告诉我实话。”"),
         ('{helper} said, "It is okay about the {breakable}. I am glad you told the truth, {name}."',
          "{helper}说：“{breakable}碎了没关系。{name}，你说了实话，我很高兴。”")),
        (None, ("{name} and {helper} cleaned up the pieces together.", "{name}和{helper}一起把碎片打扫干净了。")),
        (("{name} learned that telling the truth is always right.", "{name}明白了，说实话永远是对的。"),
         ("After that, {name} was always careful in the house.", "从那以后，{name}在家里总是小心翼翼的。")),
    )),
    Problem("lost_way", objects=TOYS, helpers=STRANGERS, beats=(  # lost, and shown the way home
        TRIP, DESCRIBE,
        (("{name} saw {a_chase} and followed it.", "{name}看见{a_chase}，就跟着它走。"),
         ("{name} ran after {a_chase}.", "{name}追着{a_chase}跑。")),
        (("Soon {name} looked around and did not know where {he} was.",
          "没过多久，{name}四处看看，不知道自己在哪里了。"),
         ("When {name} stopped, everything looked strange.", "等{name}停下来的时候，周围的一切都变得很陌生。")),
        (('{name} said, "Oh no, I am lost!"', "{name}说：“哎呀，我迷路了！”"),
         ("{name} sat down and began to cry.", "{name}坐下来，哭了起来。")),
        (('{helper_a} came by and asked, "Why are you crying?"', "{helper_a}走过来，问：“你为什么哭呀？”"),
         ("Just then, {helper_a} came along.", "就在这时，{helper_a}走了过来。")),
        (('{helper} said, "Follow me. I will take you home, {name}."', "{helper}说：“跟我来。{name}，我送你回家。”"),
         ("{helper} showed {name} the way back.", "{helper}给{name}指了回去的路。")),
        (("Soon {name} saw {his} home again.", "很快，{name}又看到了自己的家。"),
         ("Before long, {name} was back home, safe and sound.", "没过多久，{name}就平平安安地回到了家。")),
        (("{name} said thank you and promised to always stay close to home.",
          "{name}说了谢谢，还答应以后再也不走远了。"),
         ("{name} learned to always look where {he} was going.", "{name}明白了，出门在外，不能随便乱跑。")),
    )),
    Problem("rainy_day", objects=TOYS, helpers=FAMILY, beats=(  # a rainy day
        (("{when}, {name} wanted to go to {place} to play.", "{when}，{name}想去{place}玩。"),),
        (("But just as {name} put on {his} shoes, it began to rain.", "可是{name}刚穿好鞋，天就下起了雨。"),
         ("But dark clouds came, and soon rain was tapping on {name}'s window.",
          "可是乌云飘了过来，很快雨点就敲打着{name}家的窗户。"),
         ("But when {name} opened the door, big drops of rain were falling.",
          "可是{name}一打开门，就看见大滴大滴的雨落了下来。")),
        (('{name} looked out of the window and said, "Now I can\'t go out to play."',
          "{name}望着窗外说：“这下我不能出去玩了。”"),
         ("{name} pressed {his} nose to the window and felt sad.", "{name}把鼻子贴在窗户上，心里很难过。")),
        (('{helper} smiled and said, "We can have fun inside too!"', "{helper}笑着说：“我们在家里也能玩得很开心！”"),
         ('{helper} said, "I have an idea!"', "{helper}说：“我有个好主意！”")),
        "indoor",
        (None, ("{name} laughed and laughed.", "{name}笑个不停。")),
        (None, ("When the rain stopped, {name} saw a big rainbow in the sky.",
                "雨停了，{name}看见天上挂着一道大大的彩虹。")),
        (("{name} learned that a rainy day can be a happy day too.", "{name}明白了，下雨天也可以很快乐。"),
         ("It was the best rainy day {name} ever had.", "这是{name}过得最开心的一个下雨天。")),
    )),
    Problem("afraid_of_dark", objects=TOYS, helpers=FAMILY, beats=(  # afraid of the dark
        (("That night, {name} could not sleep.", "那天晚上，{name}睡不着觉。"),
         ("One night, {name} woke up in the dark.", "一天夜里，{name}在黑暗中醒了过来。")),
        (("{name}'s room was very dark, and {he} heard a strange noise.",
          "{name}的房间里黑黑的，{ta}还听到了奇怪的声音。"),
         ("{name} saw shadows on the wall that looked like monsters.", "{name}看见墙上的影子，像怪兽一样。")),
        (('{name} called out, "I am scared!"', "{name}喊道：“我好害怕！”"),
         ("{name} hid under {his} blanket and shook.", "{name}躲在被子里，浑身发抖。")),
        (("{helper} heard {name} and came in to turn on a little light.",
          "{helper}听见了{name}的声音，走进来打开了一盏小灯。"),),
        (('{helper} said, "Look, it is only the wind and the tree outside."',
          "{helper}说：“你看，那只是外面的风和大树。”"),
         ('{helper} said, "There is nothing to be afraid of. I am right here with you, {name}."',
          "{helper}说：“没什么好怕的。{name}，我就在这里陪着你。”")),
        (("{helper} sang a soft song, and {name} felt safe.", "{helper}轻轻地唱了一首歌，{name}觉得安心了。"),
         ("{helper} and {name} looked out at the moon and the stars together.",
          "{helper}和{name}一起看着窗外的月亮和星星。")),
        (("Soon {name} closed {his} eyes and fell asleep.", "很快，{name}闭上眼睛，睡着了。"),),
        (None, ("{name} learned that the dark is not so scary after all.", "{name}明白了，黑夜其实没有那么可怕。")),
    )),
    Problem("new_friend", objects=TOYS, helpers=ANYONE, beats=(  # making a new friend
        TRIP, DESCRIBE,
        (("{at}, {name} saw {friend_one} sitting all alone.", "在{at}，{name}看到{friend_one}独自坐着。"),),
        (("{name} felt a little shy, but {he} walked over and said hello.",
          "{name}有点害羞，可是{ta}还是走过去打了声招呼。"),
         ("{name} walked over with a big smile.", "{name}带着大大的笑容走了过去。")),
        (('{name} asked, "Do you want to play with me?"', "{name}问：“你想和我一起玩吗？”"),),
        (('The {friend_kind} smiled and said, "I am {friend}, and I would love to play!"',
          "{friend_kind}笑着说：“我叫{friend}，我很想和你一起玩！”"),),
        (("{name} and {friend} decided to {hobby} together.", "{name}和{friend}决定一起{hobby}。"),),
        (None, ("{name} and {friend} played until the sun went down.", "{name}和{friend}一直玩到太阳下山。"),
         ('Before going home, {friend} said, "See you tomorrow!"', "回家前，{friend}说：“明天见！”")),
        (("{name} was glad {he} said hello, because now {he} had a new friend.",
          "{name}很高兴自己打了招呼，因为现在{ta}有了一个新朋友。"),
         ("Now {name} had a new best friend.", "现在，{name}有了一个新的好朋友。")),
    )),
)


def a(noun: str) -> str:
    """The noun with its English indefinite article."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def split_sentences(text: str) -> list[str]:
    """Sentences as the stats count them: up to . ! ? (or 。！？) and a closing quote."""
    return [s.strip() for s in SENTENCE.findall(text)]


def _slots(rng: random.Random) -> tuple[Problem, dict, dict, dict]:
    """Picks a problem and fills every slot: English fields, Chinese fields, slot sentence pairs."""
    problem = rng.choice(PROBLEMS)
    weights = [k[0] for k in KINDS]
    _, kind, kind_zh, measure, ta, names = rng.choices(KINDS, weights=weights)[0]
    name, name_zh, he = rng.choice(names)
    trait = rng.choice(TRAITS) if rng.random() < 0.5 else None
    place, at, place_zh, at_zh, descs, spots = rng.choice(PLACES)
    helper = rng.choice(problem.helpers)
    obj, obj_zh, obj_measure = rng.choice(problem.objects)
    color, color_zh = rng.choice(COLORS)
    _, f_kind, f_kind_zh, f_measure, _, f_names = rng.choices(KINDS, weights=weights)[0]
    friend, friend_zh, _ = rng.choice([n for n in f_names if n[0] != name])
    creature, creature_zh = rng.choice(CREATURES)
    trouble, trouble_me, trouble_zh, fix = rng.choice(TROUBLES)
    project, project_zh, fail, fail_zh, done, done_zh = rng.choice(PROJECTS)
    (spot1, spot1_zh), (spot2, spot2_zh) = rng.sample(spots, 2)
    en = {"he": he, "He": he.capitalize(), "his": "her" if he == "she" else "his", "name": name,
          "a_kind": a(f"{trait[0]} {kind}" if trait else kind), "place": place, "at": at,
          "a_obj": a(f"{color} {obj}"), "obj": obj, "friend": friend, "friend_a": f"{a(f_kind)} named {friend}",
          "friend_one": a(f_kind), "friend_kind": f_kind, "creature": creature, "a_creature": a(creature),
          "trouble": trouble, "trouble_me": trouble_me, "project": project, "fail": fail, "done": done,
          "spot1": spot1, "spot2": spot2, "kind": kind}
    zh = {"ta": ta, "name": name_zh, "a_kind": f"一{measure}{trait[1] if trait else ''}{kind_zh}", "place": place_zh,
          "at": at_zh, "a_obj": f"一{obj_measure}{color_zh}{obj_zh}", "obj": obj_zh, "friend": friend_zh,
          "friend_a": f"一{f_measure}叫{friend_zh}的{f_kind_zh}", "friend_one": f"一{f_measure}{f_kind_zh}",
          "friend_kind": f_kind_zh, "creature": creature_zh, "a_creature": f"一只{creature_zh}", "trouble": trouble_zh,
          "project": project_zh, "fail": fail_zh, "done": done_zh, "spot1": spot1_zh, "spot2": spot2_zh,
          "kind": kind_zh}
    for key, table in (("home", HOMES), ("hobby", HOBBIES), ("when", WHEN), ("family", FAMILIES),
                       ("breakable", BREAKABLES), ("a_chase", CHASES)):
        en[key], zh[key] = rng.choice(table)
    en["helper_a"], zh["helper_a"], en["helper"], zh["helper"] = (s.format(**en) for s in helper)
    en["company"], zh["company"] = (f" with {en['helper']}", f"和{zh['helper']}一起") if helper in FAMILY else ("", "")
    return problem, en, zh, {"desc": rng.choice(descs), "fix": fix, "indoor": rng.choice(INDOORS)}


def _compose(rng: random.Random) -> tuple[list[str], list[str], Problem, dict, dict]:
    """One story as paragraphs: (English paragraphs, Chinese paragraphs, its problem and slots)."""
    problem, en, zh, slots = _slots(rng)
    paragraphs = [[rng.choices(OPENINGS, weights=OPENING_WEIGHTS)[0], rng.choice(HOBBY)], [], []]
    for i, beat in enumerate(problem.beats):
        choice = beat if isinstance(beat, str) else rng.choice(beat)
        paragraphs[2 if i == len(problem.beats) - 1 else 1].append(slots[choice] if isinstance(choice, str) else choice)
    english, chinese = [], []
    for pairs in paragraphs:
        pairs = [pair for pair in pairs if pair is not None]
        if pairs:
            sentences = [pair[0].format(**en) for pair in pairs]
            english.append(" ".join(s[0].upper() + s[1:] for s in sentences))
            chinese.append("".join(pair[1].format(**zh) for pair in pairs))
    return english, chinese, problem, en, zh


# A story with what it was made of: en_slots and zh_slots map slot names ("name", "kind",
# "place", "at", "obj", ...) to the words filled in; problem is its Problem's kind ("lost_toy", ...).
Story = namedtuple("Story", "en zh en_slots zh_slots problem")


def make_story_with_slots(rng: random.Random) -> Story:
    """One story of MIN_SENTENCES..MAX_SENTENCES sentences, with its slots (the same draws as make_story)."""
    while True:
        english, chinese, problem, en, zh = _compose(rng)
        if MIN_SENTENCES <= len(split_sentences(" ".join(english))) <= MAX_SENTENCES:
            return Story("\n\n".join(english), "\n".join(chinese), en, zh, problem.kind)


def make_story(rng: random.Random) -> tuple[str, str]:
    """One story (English, Chinese) of MIN_SENTENCES..MAX_SENTENCES sentences."""
    story = make_story_with_slots(rng)
    return story.en, story.zh


def write_sample(dest: Path, n_stories: int = 6000, seed: int = 0, shard_size: int = 1000) -> dict:
    """Writes the corpus as dest/data00.json, data01.json, ... and returns its statistics."""
    if n_stories < 1 or shard_size < 1:
        raise UserError(f"need at least one story and one story per shard (got {n_stories}, {shard_size})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n_stories):
        story_en, story_zh = make_story(rng)
        records.append({"id": f"sample-{i:05d}", "story": story_zh, "story_en": story_en})
    names, size = [], 0
    for start in range(0, n_stories, shard_size):
        names.append(f"data{start // shard_size:02d}.json")
        shard = records[start:start + shard_size]
        data = ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in shard) + "\n]\n").encode("utf-8")
        atomic_write_bytes(dest / names[-1], [data])
        size += len(data)
    for stale in dest.glob("data*.json"):  # shards of an earlier, larger corpus would be read as ours
        if re.fullmatch(r"data\d+\.json", stale.name) and stale.name not in names:
            stale.unlink()
    sentences_en = [s for r in records for s in split_sentences(r["story_en"])]
    sentences_zh = [s for r in records for s in split_sentences(r["story"])]
    return {"stories": n_stories, "shards": len(names), "files": names, "bytes": size,
            "sentences_en": len(sentences_en), "sentences_zh": len(sentences_zh),
            "distinct_sentence_ratio_en": len(set(sentences_en)) / len(sentences_en),
            "distinct_sentence_ratio_zh": len(set(sentences_zh)) / len(sentences_zh),
            "words_en": sum(len(r["story_en"].split()) for r in records),
            "chars_zh": sum(len(r["story"]) for r in records)}
