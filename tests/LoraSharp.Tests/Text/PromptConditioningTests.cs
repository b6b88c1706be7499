using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Text;

public class PromptConditioningTests
{
    static readonly Lazy<ClipTokenizer> Tok = new(() => ClipTokenizer.FromFolder(ReferenceData.PathOf("sd", "tokenizer")));

    /// <summary>A stand-in encoder: a fixed random embedding per id plus a position term, [B,77] → [B,77,8].</summary>
    static Func<Tensor, Tensor> FakeEncoder()
    {
        var table = randn([49408, 8], generator: new Generator(11));
        var pos = randn([77, 8], generator: new Generator(12));
        return ids => table.index_select(0, ids.flatten()).reshape(ids.shape[0], ids.shape[1], 8) + pos;
    }

    [Fact]
    public void Cond_and_uncond_of_different_lengths_encode_to_the_same_sequence_length()
    {
        using var scope = NewDisposeScope();
        var enc = FakeEncoder();
        var longPrompt = string.Join(", ", Enumerable.Repeat("a red apple", 30));
        var (hidden, parsed) = PromptConditioning.Encode(Tok.Value, [longPrompt, ""], enc, CPU);
        int chunks = PromptChunker.Tokenize(Tok.Value, longPrompt).Chunks.Count;
        Assert.True(chunks >= 2);
        Assert.Equal(new long[] { 2, chunks * 77, 8 }, hidden.shape);
        Assert.Equal(2, parsed.Count);
        // the uncond's extra chunks are empty chunks
        var empty = PromptChunker.EmptyChunk(Tok.Value);
        var expected = enc(tensor(empty.Tokens.Select(i => (long)i).ToArray()).reshape(1, 77));
        Assert.True(allclose(hidden[1, 77..154].unsqueeze(0), expected, rtol: 1e-6, atol: 1e-6));
    }

    [Fact]
    public void Emphasis_is_applied_per_chunk_with_the_token_weights()
    {
        using var scope = NewDisposeScope();
        var enc = FakeEncoder();
        var (hidden, _) = PromptConditioning.Encode(Tok.Value, ["a (cat:1.5) <lora:style:0.8>"], enc, CPU);
        var t = PromptChunker.Tokenize(Tok.Value, "a (cat:1.5)");
        var ids = tensor(t.AllTokens().Select(i => (long)i).ToArray()).reshape(1, 77);
        var expected = PromptEmphasis.Apply(enc(ids), t.AllMultipliers());
        Assert.True(allclose(hidden, expected, rtol: 1e-6, atol: 1e-6));
        Assert.False(allclose(hidden, enc(ids), rtol: 1e-3, atol: 1e-3));
    }

    [Fact]
    public void Lora_requests_come_back_with_the_parsed_prompt()
    {
        using var scope = NewDisposeScope();
        var (_, parsed) = PromptConditioning.Encode(Tok.Value, ["a cat <lora:style:0.8>"], FakeEncoder(), CPU);
        Assert.Equal("style", Assert.Single(parsed[0].Loras).Name);
    }

    [Fact]
    public void Original_emphasis_on_a_zero_mean_output_stays_finite()
    {
        using var scope = TorchSharp.torch.NewDisposeScope();
        // Rows of +1/-1: the mean over the tensor is exactly 0, as after a LayerNorm with zero bias.
        var hidden = TorchSharp.torch.tensor(new float[] { 1, -1, 1, -1, 2, -2 }).reshape(1, 3, 2);
        var z = PromptEmphasis.Apply(hidden, TorchSharp.torch.tensor(new float[] { 1f, 1.1f, 1f }));
        Assert.False(z.isnan().any().item<bool>());
        Assert.Equal(1.1f * 1, z[0, 1, 0].item<float>(), 5);
    }
}
