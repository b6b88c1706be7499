using CsCheck;
using LoraSharp.Text;

namespace LoraSharp.Tests.Text;

public class PromptParserTests
{
    static void AssertFragments(IReadOnlyList<PromptFragment> actual, params (string Text, double Weight)[] expected)
    {
        Assert.Equal(expected.Length, actual.Count);
        for (int i = 0; i < expected.Length; i++)
        {
            if (expected[i].Text == "BREAK" && expected[i].Weight == -1)
            {
                Assert.True(actual[i].IsBreak, $"fragment {i} should be BREAK, got {actual[i]}");
                continue;
            }
            Assert.False(actual[i].IsBreak);
            Assert.Equal(expected[i].Text, actual[i].Text);
            Assert.Equal(expected[i].Weight, actual[i].Weight, 1e-12);
        }
    }

    [Fact] public void Plain_text_is_one_fragment_of_weight_one() => AssertFragments(PromptParser.ParseAttention("normal text"), ("normal text", 1.0));

    [Fact] public void Round_brackets_multiply_by_1_1() => AssertFragments(PromptParser.ParseAttention("an (important) word"), ("an ", 1.0), ("important", 1.1), (" word", 1.0));

    [Fact] public void Double_round_brackets_multiply_by_1_21() => AssertFragments(PromptParser.ParseAttention("((word))"), ("word", 1.1 * 1.1));

    [Fact] public void Square_brackets_divide_by_1_1() => AssertFragments(PromptParser.ParseAttention("[word]"), ("word", 1 / 1.1));

    [Fact] public void Explicit_weight_replaces_the_bracket_multiplier() => AssertFragments(PromptParser.ParseAttention("(word:1.3)"), ("word", 1.3));

    [Fact] public void Explicit_weight_allows_spaces_and_signs() => AssertFragments(PromptParser.ParseAttention("(a: -0.5 ) (b:+.5)"), ("a", -0.5), (" ", 1.0), ("b", 0.5));

    [Fact] public void Unbalanced_bracket_applies_to_the_rest() => AssertFragments(PromptParser.ParseAttention("(unbalanced"), ("unbalanced", 1.1));

    [Fact] public void Escapes_give_literal_brackets() => AssertFragments(PromptParser.ParseAttention(@"\(literal\]"), ("(literal]", 1.0));

    [Fact] public void Escaped_colon_is_not_a_weight() => AssertFragments(PromptParser.ParseAttention(@"(a\:1.2)"), ("a:1.2", 1.1));

    [Fact] public void Escaped_backslash_is_one_backslash() => AssertFragments(PromptParser.ParseAttention(@"a\\b"), (@"a\b", 1.0));

    [Fact] public void Adjacent_equal_weights_merge() => AssertFragments(PromptParser.ParseAttention("(unnecessary)(parens)"), ("unnecessaryparens", 1.1));

    [Fact]
    public void A1111_documented_example_parses_identically()
    {
        AssertFragments(PromptParser.ParseAttention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            ("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.1 * 1.1 * 1.1 * 1.1), (".", 1.1));
    }

    [Fact]
    public void Break_splits_fragments_and_swallows_spaces() =>
        AssertFragments(PromptParser.ParseAttention("a cat BREAK (a dog)"), ("a cat", 1.0), ("BREAK", -1), ("", 1.0), ("a dog", 1.1));

    [Fact]
    public void Break_must_be_upper_case_whole_word() =>
        AssertFragments(PromptParser.ParseAttention("break BREAKING"), ("break BREAKING", 1.0));

    [Fact] public void Empty_prompt_is_one_empty_fragment() => AssertFragments(PromptParser.ParseAttention(""), ("", 1.0));

    [Fact]
    public void Lora_tag_with_one_weight_sets_te_and_unet()
    {
        var p = PromptParser.Parse("portrait <lora:myStyle:0.8> of a woman");
        Assert.Equal("portrait  of a woman", p.Text);
        var lora = Assert.Single(p.Loras);
        Assert.Equal(new LoraRequest("myStyle", 0.8, 0.8, null, null, "lora", lora.ExtraArgs), lora);
        Assert.Empty(p.Problems);
    }

    [Fact]
    public void Lora_tag_without_weight_uses_default_multiplier()
    {
        var lora = Assert.Single(PromptParser.Parse("<lora:x>", defaultMultiplier: 0.7).Loras);
        Assert.Equal(0.7, lora.TextEncoderWeight);
        Assert.Equal(0.7, lora.UNetWeight);
    }

    [Fact]
    public void Positional_te_unet_dyn_fields()
    {
        var lora = Assert.Single(PromptParser.Parse("<lora:x:0.5:0.9:16>").Loras);
        Assert.Equal((0.5, 0.9, (int?)16), (lora.TextEncoderWeight, lora.UNetWeight, lora.DynamicDim));
    }

    [Fact]
    public void Named_arguments_override_positional_ones()
    {
        var lora = Assert.Single(PromptParser.Parse("<lora:x:1:te=0.25:unet=0.75:dyn=8:lbw=OUTD:start=5>").Loras);
        Assert.Equal((0.25, 0.75, (int?)8, "OUTD"), (lora.TextEncoderWeight, lora.UNetWeight, lora.DynamicDim, lora.BlockWeights));
        Assert.Equal("5", lora.ExtraArgs!["start"]);
    }

    [Fact]
    public void Lbw_vector_is_kept_as_written()
    {
        var lora = Assert.Single(PromptParser.Parse("<lora:x:1:lbw=1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0>").Loras);
        Assert.Equal("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0", lora.BlockWeights);
        Assert.Equal(1.0, lora.UNetWeight);
    }

    [Fact]
    public void Old_lbw_syntax_third_field_preset()
    {
        var lora = Assert.Single(PromptParser.Parse("<lora:x:0.6:MIDD>").Loras);
        Assert.Equal(("MIDD", 0.6, 0.6), (lora.BlockWeights, lora.TextEncoderWeight, lora.UNetWeight));
    }

    [Fact]
    public void Lyco_tag_is_an_alias()
    {
        var p = PromptParser.Parse("<lyco:loha_style:0.7> <lora:b:1>");
        Assert.Equal(["loha_style", "b"], p.Loras.Select(l => l.Name));
        Assert.Equal("lyco", p.Loras[0].Kind);
    }

    [Fact]
    public void Other_extra_networks_are_removed_and_reported()
    {
        var p = PromptParser.Parse("a <hypernet:h:1> cat");
        Assert.Empty(p.Loras);
        Assert.Equal("hypernet", Assert.Single(p.OtherNetworks).Kind);
        Assert.Equal("a  cat", p.Text);
    }

    [Fact]
    public void Bad_lora_weight_is_a_problem_not_an_exception()
    {
        var p = PromptParser.Parse("<lora:x:abc:1:2>");
        Assert.Empty(p.Loras);
        Assert.Contains(p.Problems, m => m.Contains("'abc' is not a number"));
        var e = Assert.Throws<LoraSharpException>(p.ThrowIfInvalid);
        Assert.Contains("<lora:x:abc:1:2>", e.Message);
    }

    [Fact]
    public void Emphasis_none_keeps_brackets_literal()
    {
        var p = PromptParser.Parse("(a) <lora:x:1>", parseEmphasis: false);
        AssertFragments(p.Fragments, ("(a) ", 1.0));
        Assert.Single(p.Loras);
    }

    // ---- properties ----

    static readonly Gen<string> Anything = Gen.String[Gen.Char["()[]:\\<>=,. 0123456789abcBREAKlorayc\n-+|"], 0, 80];

    [Fact]
    public void Parser_never_throws_on_random_strings() =>
        Anything.Sample(s =>
        {
            var p = PromptParser.Parse(s);
            Assert.NotEmpty(p.Fragments);
            Assert.All(p.Fragments, f => Assert.True(f.IsBreak || double.IsFinite(f.Weight)));
        }, iter: 3000);

    [Fact]
    public void Parser_never_throws_on_arbitrary_unicode() =>
        Gen.String.Sample(s => { _ = PromptParser.Parse(s); }, iter: 2000);

    [Fact]
    public void Plain_text_round_trips() =>
        Gen.String[Gen.Char["abcdefgh ,.!?-_'\"0123456789xyzéü猫"], 0, 60]
            .Where(s => !s.Contains("BREAK"))
            .Sample(s =>
            {
                var f = Assert.Single(PromptParser.Parse(s).Fragments);
                Assert.Equal(s, f.Text);
                Assert.Equal(1.0, f.Weight);
            }, iter: 2000);

    [Fact]
    public void Nested_brackets_multiply_weights() =>
        Gen.Select(Gen.Int[0, 5], Gen.Int[0, 5], Gen.Int[1, 300]).Sample((round, square, w100) =>
        {
            double w = w100 / 100.0;
            var text = new string('(', round) + new string('[', square) + $"(word:{w100 / 100.0:0.00})" + new string(']', square) + new string(')', round);
            var f = Assert.Single(PromptParser.ParseAttention(text));
            Assert.Equal("word", f.Text);
            Assert.Equal(w * Math.Pow(1.1, round) * Math.Pow(1 / 1.1, square), f.Weight, 1e-9);
        }, iter: 500);

    [Fact]
    public void Lora_tags_are_always_removed_from_the_text() =>
        Gen.Select(Gen.String[Gen.Char["abc ,()"], 0, 20], Gen.String[Gen.Char["abcXYZ_-0123456789"], 1, 12], Gen.Int[0, 200])
            .Sample((text, name, w) =>
            {
                var p = PromptParser.Parse($"{text}<lora:{name}:{w / 100.0:0.00}>{text}");
                Assert.DoesNotContain("<lora:", p.Text);
                var lora = Assert.Single(p.Loras);
                Assert.Equal(name, lora.Name);
                Assert.Equal(w / 100.0, lora.TextEncoderWeight, 1e-9);
            }, iter: 500);
}
