using LoraSharp.Models.Llama;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Llama;

public class LlamaGeneratorTests
{
    static LlamaForCausalLM Model() =>
        new(LlamaModelTests.Tiny(), ScalarType.Float32, CPU, WeightInit.Random, initStd: 0.3, generator: new Generator(5));

    static readonly int[] Prompt = [1, 17, 42, 9];

    [Fact]
    public void Same_seed_gives_the_same_sample_and_other_seeds_differ()
    {
        using var model = Model();
        var options = new GenerationOptions { Sample = true, Temperature = 1.5, MaxNewTokens = 16, Seed = 1234 };
        var a = LlamaGenerator.GenerateAll(model, Prompt, options);
        var b = LlamaGenerator.GenerateAll(model, Prompt, options);
        Assert.Equal(a, b);
        var others = Enumerable.Range(0, 4).Select(s => LlamaGenerator.GenerateAll(model, Prompt, options with { Seed = s })).ToList();
        Assert.Contains(others, o => !o.SequenceEqual(a));
    }

    [Fact]
    public void Cached_and_uncached_sampling_agree()
    {
        using var model = Model();
        var options = new GenerationOptions { Sample = true, MaxNewTokens = 12, Seed = 9, TopK = 20, TopP = 0.9, RepetitionPenalty = 1.3 };
        Assert.Equal(LlamaGenerator.GenerateAll(model, Prompt, options), LlamaGenerator.GenerateAll(model, Prompt, options with { UseCache = false }));
    }

    [Fact]
    public void Top_k_of_one_is_greedy()
    {
        using var model = Model();
        var greedy = LlamaGenerator.GenerateAll(model, Prompt, new GenerationOptions { MaxNewTokens = 10 });
        var topOne = LlamaGenerator.GenerateAll(model, Prompt, new GenerationOptions { MaxNewTokens = 10, Sample = true, TopK = 1, Seed = 3 });
        Assert.Equal(greedy, topOne);
    }

    [Fact]
    public void Stop_token_ends_generation_and_is_yielded()
    {
        using var model = Model();
        var free = LlamaGenerator.GenerateAll(model, Prompt, new GenerationOptions { MaxNewTokens = 10 });
        var stop = free[3];
        var stopped = LlamaGenerator.GenerateAll(model, Prompt, new GenerationOptions { MaxNewTokens = 10, StopTokens = [stop] });
        Assert.Equal(free.Take(free.IndexOf(stop) + 1), stopped);
    }

    [Fact]
    public void Tokens_stream_one_at_a_time()
    {
        using var model = Model();
        var seen = new List<int>();
        var all = LlamaGenerator.GenerateAll(model, Prompt, new GenerationOptions { MaxNewTokens = 5 }, seen.Add);
        Assert.Equal(all, seen);
        Assert.Equal(all.Take(2), LlamaGenerator.Generate(model, Prompt, new GenerationOptions { MaxNewTokens = 5 }).Take(2));
    }

    [Fact]
    public void Repetition_penalty_divides_positive_and_multiplies_negative_logits()
    {
        using var scope = NewDisposeScope();
        var logits = tensor(new float[] { 2f, -2f, 1f, -1f });
        var result = LlamaGenerator.ApplyRepetitionPenalty(logits, [0, 1, 1], 2.0).data<float>().ToArray();
        Assert.Equal(new float[] { 1f, -4f, 1f, -1f }, result);
    }

    [Fact]
    public void Top_p_keeps_the_smallest_set_reaching_p()
    {
        using var scope = NewDisposeScope();
        // probabilities 0.5, 0.25, 0.125, 0.125
        var logits = tensor(new float[] { MathF.Log(0.5f), MathF.Log(0.25f), MathF.Log(0.125f), MathF.Log(0.125f) });
        var kept = LlamaGenerator.TopP(logits, 0.7).data<float>().Select(float.IsFinite).ToArray();
        Assert.Equal(new[] { true, true, false, false }, kept);
        Assert.Equal(new[] { true, false, false, false }, LlamaGenerator.TopP(logits, 0.3).data<float>().Select(float.IsFinite).ToArray());
        Assert.Equal(new[] { true, true, false, false }, LlamaGenerator.TopK(logits, 2).data<float>().Select(float.IsFinite).ToArray());
    }

    [Fact]
    public void Invalid_options_are_rejected()
    {
        using var model = Model();
        Assert.Throws<ArgumentOutOfRangeException>(() => LlamaGenerator.Generate(model, Prompt, new GenerationOptions { Sample = true, Temperature = 0 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => LlamaGenerator.Generate(model, Prompt, new GenerationOptions { TopP = 1.5 }));
        Assert.Throws<ArgumentException>(() => LlamaGenerator.Generate(model, [], null));
    }
}
