using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Text;

public class PromptChunkerTests
{
    static readonly Lazy<ClipTokenizer> Tok = new(() => ClipTokenizer.FromFolder(ReferenceData.PathOf("sd", "tokenizer")));

    [Fact]
    public void Short_prompt_is_one_chunk_equal_to_the_tokenizer_input()
    {
        var t = PromptChunker.Tokenize(Tok.Value, "a photo of a cat");
        var chunk = Assert.Single(t.Chunks);
        Assert.Equal(Tok.Value.Encode("a photo of a cat"), chunk.Tokens);
        Assert.All(chunk.Multipliers, m => Assert.Equal(1f, m));
        Assert.Equal(5, t.TokenCount);
    }

    [Fact]
    public void Empty_prompt_is_one_empty_chunk()
    {
        var t = PromptChunker.Tokenize(Tok.Value, "");
        Assert.Equal(PromptChunker.EmptyChunk(Tok.Value).Tokens, Assert.Single(t.Chunks).Tokens);
        Assert.Equal(0, t.TokenCount);
    }

    [Fact]
    public void Long_prompt_splits_into_75_token_chunks()
    {
        var prompt = string.Join(' ', Enumerable.Repeat("word", 80));
        var t = PromptChunker.Tokenize(Tok.Value, prompt);
        Assert.Equal(2, t.Chunks.Count);
        Assert.Equal(80, t.TokenCount);
        Assert.Equal(Tok.Value.Encode(prompt), t.Chunks[0].Tokens); // first chunk = the truncated 77-token input
        var second = t.Chunks[1].Tokens;
        Assert.Equal(77, second.Length);
        Assert.Equal(Tok.Value.BosId, second[0]);
        Assert.Equal(5, second.Skip(1).TakeWhile(id => id != Tok.Value.EosId).Count());
    }

    [Fact]
    public void Overflowing_chunk_is_cut_after_a_recent_comma()
    {
        var prompt = string.Join(' ', Enumerable.Repeat("word", 70)) + ", " + string.Join(' ', Enumerable.Repeat("word", 10));
        var t = PromptChunker.Tokenize(Tok.Value, prompt);
        Assert.Equal(2, t.Chunks.Count);
        var first = t.Chunks[0].Tokens;
        Assert.Equal(Tok.Value.CommaId, first[71]);           // BOS + 70 words + comma
        Assert.All(first.Skip(72), id => Assert.Equal(Tok.Value.EosId, id));
        Assert.Equal(10, t.Chunks[1].Tokens.Skip(1).TakeWhile(id => id != Tok.Value.EosId).Count());
        Assert.Equal(85, t.TokenCount);                       // A1111 counts a full chunk as 75
    }

    [Fact]
    public void Comma_further_back_than_the_backtrack_is_ignored()
    {
        var prompt = string.Join(' ', Enumerable.Repeat("word", 40)) + ", " + string.Join(' ', Enumerable.Repeat("word", 40));
        var t = PromptChunker.Tokenize(Tok.Value, prompt);
        Assert.Equal(Tok.Value.EncodeTokens("word")[0], t.Chunks[0].Tokens[75]);
        Assert.Equal(6, t.Chunks[1].Tokens.Skip(1).TakeWhile(id => id != Tok.Value.EosId).Count());
    }

    [Fact]
    public void Break_starts_a_new_chunk()
    {
        var t = PromptChunker.Tokenize(Tok.Value, "a cat BREAK a dog");
        Assert.Equal(2, t.Chunks.Count);
        Assert.Equal(Tok.Value.Encode("a cat"), t.Chunks[0].Tokens);
        Assert.Equal(Tok.Value.Encode("a dog"), t.Chunks[1].Tokens);
    }

    [Fact]
    public void Weights_follow_their_tokens()
    {
        var t = PromptChunker.Tokenize(Tok.Value, "a (cat:1.5) and [dog]");
        var m = Assert.Single(t.Chunks).Multipliers;
        Assert.Equal([1f, 1f, 1.5f, 1f, (float)(1 / 1.1), 1f, 1f], m.Take(7));
    }

    [Fact]
    public void Cond_and_uncond_are_padded_to_the_same_chunk_count()
    {
        var cond = PromptChunker.Tokenize(Tok.Value, string.Join(' ', Enumerable.Repeat("word", 100)));
        var uncond = PromptChunker.Tokenize(Tok.Value, "");
        var padded = PromptChunker.PadToSameLength(Tok.Value, cond, uncond);
        Assert.Equal(2, padded[1].Chunks.Count);
        Assert.Equal(2 * 77, padded[1].AllTokens().Length);
        Assert.Equal(2 * 77, padded[1].AllMultipliers().Length);
    }

    [Fact]
    public void Original_emphasis_weights_tokens_and_restores_the_mean()
    {
        using var scope = NewDisposeScope();
        var gen = new TorchSharp.torch.Generator(7);
        var z = randn([2, 77, 8], generator: gen) + 0.5;
        var w = Enumerable.Repeat(1f, 77).ToArray();
        w[3] = 1.5f;
        w[10] = 0.5f;
        var noNorm = PromptEmphasis.Apply(z, w, EmphasisMode.NoNorm);
        Assert.True(allclose(noNorm[.., 3], z[.., 3] * 1.5));
        Assert.True(allclose(noNorm[.., 0], z[.., 0]));

        var original = PromptEmphasis.Apply(z, w, EmphasisMode.Original);
        Assert.Equal(z.mean().item<float>(), original.mean().item<float>(), 1e-5);
        var scale = (z.mean() / noNorm.mean()).item<float>();
        Assert.True(allclose(original, noNorm * scale, rtol: 1e-5, atol: 1e-6));

        Assert.True(allclose(PromptEmphasis.Apply(z, w, EmphasisMode.None), z, rtol: 0, atol: 0));
    }

    [Fact]
    public void Unit_weights_leave_hidden_states_unchanged()
    {
        using var scope = NewDisposeScope();
        var z = randn([1, 77, 4]);
        var ones = Enumerable.Repeat(1f, 77).ToArray();
        Assert.True(allclose(PromptEmphasis.Apply(z, ones), z, rtol: 1e-6, atol: 1e-6));
    }

    [Fact]
    public void Emphasis_rejects_mismatched_weight_count()
    {
        using var scope = NewDisposeScope();
        Assert.Throws<ArgumentException>(() => PromptEmphasis.Apply(zeros(1, 77, 4), new float[10]));
    }
}
